# Prints {"pid": N, "started": "..."}: the ansible-playbook process running this play on the controller, and its
# start time (ps -o lstart=), for the fleet deploy lock's liveness check (docs/adr/0502-deploy-lock-liveness.md).
# Run by a pipe lookup (sh -c ... in an ansible worker, itself a fork of ansible-playbook with the same command
# line): walk up to the first ansible process, then up while the parent has the same command line.
ppid_of() { ps -o ppid= -p "$1" | tr -d ' '; }
pid=$$
while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
    case "$(ps -o args= -p "$pid")" in *ansible*) break ;; esac
    pid=$(ppid_of "$pid")
done
if [ -z "$pid" ] || [ "$pid" -le 1 ]; then
    echo '{"pid": null, "started": ""}'
    exit 0
fi
args=$(ps -o args= -p "$pid")
while :; do
    parent=$(ppid_of "$pid")
    [ -n "$parent" ] && [ "$parent" -gt 1 ] || break
    [ "$(ps -o args= -p "$parent")" = "$args" ] || break
    pid=$parent
done
printf '{"pid": %s, "started": "%s"}\n' "$pid" "$(ps -o lstart= -p "$pid" | sed 's/  */ /g; s/^ //; s/ $//')"
