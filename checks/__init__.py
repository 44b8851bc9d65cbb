"""The checks: the comparisons (pure functions) and the coverage report."""

import os

# gRPC's fork() handlers (on by default in grpcio 1.85) wait inside fork() for gRPC's threads to stop, and can
# wait for ever: a suite run hung there when the coverage report forked its reader (checks/report.py) in a
# process whose Firestore calls had left gRPC's threads running. The child never uses gRPC. Read once, when
# gRPC is first imported: this runs before any module of the package imports it.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
