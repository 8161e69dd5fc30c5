"""What the source agent exports at /metrics, read from its state at scrape time."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.runtime.metrics import Scrape

if TYPE_CHECKING:
    from source_agent.agent import SourceAgent

#: Every state a connection's sender sets (see sender.py); exported one-hot so a
#: dashboard can sum by state. An unknown state is still exported, as its own series.
CONNECTION_STATES = ("starting", "connecting", "replicating", "disconnected", "error",
                     "stopped", "restore-required")


#: Watch-mode series, from each watcher's status: (status key, kind, help).
WATCH_SERIES = (
    ("events", "counter", "Kernel notifications read (watch mode)."),
    ("overflows", "counter", "Times events were lost (kernel or agent queue overflow) and a "
     "rescan caught up."),
    ("lost_watches", "counter", "inotify watches that could not be added."),
    ("rescans", "counter", "Subtree rescans (lost events, new directories)."),
    ("pending_events", "gauge", "Events read but not yet compared."),
    ("bytes_read", "counter", "Bytes of files read to find changed blocks."),
    ("data_bytes_sent", "counter", "Bytes of changed blocks sent."),
    ("errors", "counter", "Entries that could not be read (retried)."),
    ("index_entries", "gauge", "Entries in the index of what was sent."),
)


def collect_source(agent: SourceAgent, scrape: Scrape) -> None:
    """Fill ``scrape`` from ``agent``'s volumes, connections, senders and jobs."""
    node = agent.config.node
    for v in agent.volumes.values():
        journal = v.journal
        scrape.gauge("journal_memory_bytes", "Journal bytes held in memory (queue).",
                     journal.memory_bytes, node=node, volume=v.name)
        scrape.gauge("journal_disk_bytes", "Journal bytes on disk (queue).",
                     journal.disk_bytes, node=node, volume=v.name)
        scrape.gauge("journal_disk_limit_bytes", "Configured journal disk bound.",
                     v.disk_limit, node=node, volume=v.name)
        scrape.gauge("captured_seq", "Last op captured into the journal.",
                     journal.last_seq, node=node, volume=v.name)
        scrape.gauge("durable_seq", "Last op fsynced in the journal.",
                     journal.durable_seq, node=node, volume=v.name)
        scrape.counter("journal_failures", "Journal appends that failed.",
                       v.journal_failures, node=node, volume=v.name)
        scrape.counter("journal_appended_bytes", "Bytes of records appended to the journal "
                       "since the agent started (throughput into the queue).",
                       journal.appended_bytes, node=node, volume=v.name)
        scrape.histogram("journal_fsync_seconds", "Time one fsync of the journal took.",
                         journal.fsync_latency, node=node, volume=v.name)
        scrape.gauge("journal_fsync_max_seconds", "Longest journal fsync in the last 1-2 "
                     "minutes.", journal.fsync_latency.snapshot()[3], node=node,
                     volume=v.name)
    for name, watcher in agent.watchers.items():
        st = watcher.status()
        wlabels = {"node": node, "volume": name, "backend": str(st["backend"])}
        for key, kind, help_text in WATCH_SERIES:
            (scrape.counter if kind == "counter" else scrape.gauge)(
                f"watch_{key}", help_text, st[key], **wlabels)
    for c in agent.registry.connections.values():
        volume = agent.volumes[c.volume]
        journal = volume.journal
        labels = {"conid": c.id, "volume": c.volume, "node": node}
        ops_behind = max(journal.last_seq - c.acked_seq, 0)
        lag_bytes = journal.bytes_after(c.acked_seq)   # the estimate status shows too
        scrape.gauge("lag_ops", "Ops captured but not yet durable on the target.",
                     ops_behind, **labels)
        scrape.gauge("lag_bytes", "Journal bytes not yet durable on the target (estimate).",
                     lag_bytes, **labels)
        scrape.gauge("lag_seconds", "Age of the oldest op not yet durable on the target.",
                     volume.lag_seconds(c.acked_seq), **labels)
        scrape.gauge("sent_seq", "Last op sent to the target.", c.sent_seq, **labels)
        scrape.gauge("acked_seq", "Last op the target acknowledged as durable.",
                     c.acked_seq, **labels)
        scrape.counter("sent_bytes", "Bytes of ops sent to the target.", c.bytes_sent,
                       **labels)
        scrape.counter("sent_ops", "Ops sent to the target.", c.ops_sent, **labels)
        scrape.counter("sent_wire_bytes", "Bytes of OPS frames sent to the target, after "
                       "compression.", c.wire_bytes_sent, **labels)
        limit = c.bandwidth_limit()
        if limit is not None:
            scrape.gauge("bandwidth_limit_bytes", "Bandwidth limit in force (bytes/s; no "
                         "sample: unlimited).", limit, **labels)
        if c.error.last_seen is not None:
            scrape.gauge("last_error_timestamp_seconds", "Wall time of the connection's "
                         "most recent error (kept after it cleared).", c.error.last_seen,
                         **labels)
        scrape.gauge("replicating", "1 when replication is started for the connection.",
                     int(c.replicating), **labels)
        scrape.gauge("mirror_required", "1 when the connection needs a mirror.",
                     int(c.mirror_required), **labels)
        for state in (*CONNECTION_STATES,
                      *(() if c.state in CONNECTION_STATES else (c.state,))):
            scrape.gauge("connection_state", "1 for the connection's current state.",
                         int(c.state == state), state=state, **labels)
        entry = agent.senders.get(c.id)
        if entry is not None:
            sender = entry[0]
            for reason, count in sender.failures.items():
                scrape.counter("reconnects", "Failed sessions and connection attempts, by "
                               "reason.", count, reason=reason, **labels)
            if sender.last_ack_time is not None:
                scrape.gauge("last_ack_timestamp_seconds",
                             "Wall time of the last ack that advanced acked_seq.",
                             sender.last_ack_time, **labels)
        job = agent.jobs.get(c.id)
        if job is not None:
            scrape.gauge("mirror_files_done", "Files the current/last mirror job handled.",
                         job.files_done, **labels)
            scrape.gauge("mirror_files_total", "Files the current/last mirror job found.",
                         job.files_total, **labels)
            scrape.gauge("mirror_bytes_done", "Bytes the current/last mirror job handled.",
                         job.bytes_done, **labels)
            scrape.gauge("mirror_bytes_total", "Bytes the current/last mirror job found.",
                         job.bytes_total, **labels)
    for result, count in agent.task_store.result_counts().items():
        scrape.gauge("task_results", "Finished tasks kept in the task store, by result.",
                     count, result=result, node=node)
