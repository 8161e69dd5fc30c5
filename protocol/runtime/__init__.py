"""The trio side shared by both agents: frame streams, control sockets, sd_notify, logging.

This is the only part of ``protocol`` that imports trio or touches the OS.
"""
