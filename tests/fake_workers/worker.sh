#!/bin/sh
# A stand-in for `clinic-migrate` on the legacy host, for tests/test_launch_paths.py.
#
#   worker.sh MARKERS DELAY REAL_WORKER <clinic-migrate arguments...>
#
# Every call leaves a marker MARKERS/<subcommand>.<pid> holding its arguments, so a test can prove
# that a worker ran (or never ran). `migrate` then sleeps DELAY seconds (runs overlap long enough to
# watch the run queue) and behaves by its --usuario (the only thing a run's launcher chooses):
#   silent*  reads its input, prints nothing, exits 0
#   plain*   reads its input, prints plain text, exits 0
#   pipes*   speaks Dagster Pipes (opens, logs, closes) but never reports a materialization, exits 0
#   victim*  speaks Pipes, then writes MARKERS/ready.<usuario> and waits to be killed
#   flaky*   the first call behaves as victim*; every later one is the real worker
#   anything else: exec's the real worker
# Before it behaves, `migrate` writes its PID (the worker's: exec keeps it) to MARKERS/pid.<usuario>
# and appends it to MARKERS/pids.<usuario> (every attempt's).
markers=$1
delay=$2
real=$3
shift 3
here=$(dirname "$0")
python=$(dirname "$real")/python
usuario=""
prev=""
for arg in "$@"; do
    [ "$prev" = "--usuario" ] && usuario=$arg
    prev=$arg
done
printf '%s\n' "$*" > "$markers/$1.$$"
[ "$1" = migrate ] || exec "$real" "$@"
sleep "$delay"
printf '%s\n' "$$" > "$markers/pid.$usuario"
printf '%s\n' "$$" >> "$markers/pids.$usuario"
case "$usuario" in
    silent*) cat > /dev/null; exit 0 ;;
    plain*) cat > /dev/null; echo "done, 12 rows migrated"; echo "all good" >&2; exit 0 ;;
    pipes*) exec "$python" "$here/pipes_worker.py" no-report ;;
    victim*) exec "$python" "$here/pipes_worker.py" hang "$markers/ready.$usuario" ;;
    flaky*)
        if [ ! -e "$markers/flaked.$usuario" ]; then
            : > "$markers/flaked.$usuario"
            exec "$python" "$here/pipes_worker.py" hang "$markers/ready.$usuario"
        fi ;;
esac
exec "$real" "$@"
