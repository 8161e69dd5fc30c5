"""What the target agent exports at /metrics, read from its replicas at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.runtime.metrics import Scrape

if TYPE_CHECKING:
    from target_agent.agent import TargetAgent


def collect_target(agent: TargetAgent, scrape: Scrape) -> None:
    """Fill ``scrape`` from ``agent``'s replicas; ``node`` is the source node."""
    scrape.counter("refused_sessions", "Sessions refused (authentication, admission).",
                   agent.refused_sessions)
    for r in agent.replicas.values():
        labels = {"conid": r.conid, "node": r.node}
        scrape.gauge("applied_seq", "Last op applied and checkpointed (durable).",
                     r.applied_seq, **labels)
        scrape.gauge("received_seq", "Last op received from the source.",
                     r.received_seq, **labels)
        scrape.gauge("apply_backlog_ops", "Ops received but not yet checkpointed.",
                     max(r.received_seq - r.applied_seq, 0), **labels)
        scrape.counter("ops_applied", "Ops applied to the replica.", r.ops_applied, **labels)
        scrape.counter("bytes_applied", "Bytes of ops applied to the replica.",
                       r.bytes_applied, **labels)
        scrape.counter("apply_failures", "Failed apply attempts.", r.apply_failures, **labels)
        scrape.gauge("paused", "1 while applying is failing and being retried.",
                     int(r.state == "paused"), **labels)
        scrape.gauge("mirror_required", "1 when the replica needs a mirror.",
                     int(r.mirror_required), **labels)
        scrape.histogram("checkpoint_seconds", "Time one checkpoint took (fsync of what "
                         "it covers, then the state file).", r.checkpoint_latency, **labels)
        scrape.gauge("checkpoint_max_seconds", "Longest checkpoint in the last 1-2 minutes.",
                     r.checkpoint_latency.snapshot()[3], **labels)
        scrape.histogram("checkpoint_fsync_seconds", "Time a checkpoint's fsync of the "
                         "touched files and directories took.", r.fsync_latency, **labels)
        scrape.gauge("checkpoint_fsync_max_seconds", "Longest checkpoint fsync in the last "
                     "1-2 minutes.", r.fsync_latency.snapshot()[3], **labels)
        if r.error.last_seen is not None:
            scrape.gauge("last_error_timestamp_seconds", "Wall time of the replica's most "
                         "recent error (kept after it cleared).", r.error.last_seen, **labels)
        if r.last_checkpoint is not None:
            scrape.gauge("last_checkpoint_timestamp_seconds",
                         "Wall time of the last checkpoint.", r.last_checkpoint, **labels)
    for result, count in agent.tasks.result_counts().items():
        scrape.gauge("task_results", "Finished tasks kept in the task store, by result.",
                     count, result=result)
