"""
A side-by-side benchmark of wsgw against two real peers (Pushpin and nchan).

Run it with ``python -m bench`` (see ``bench/__main__.py``).  The modules:
``peers`` (the servers under test and how to start them), ``loadgen`` (the
Node load generator and app, driven from Python), ``procs`` (processes,
cores, memory and CPU from /proc), ``workloads`` (W1-W5) and ``report``
(the Markdown table).
"""
