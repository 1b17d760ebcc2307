# Sourced by the GPU session scripts (gpu_session.sh, speculative_session.sh, serving_session.sh), which set
# $results first. step NAME COMMAND...: run COMMAND, its output to $results/NAME.log, and a start line and an
# end line with its exit status in $results/progress.txt (what the polling calls print).
step() {
  local name=$1; shift
  echo "$(date +%T) start $name" >> "$results/progress.txt"
  "$@" > "$results/$name.log" 2>&1
  local rc=$?   # before $(date) below, which would set $? to its own status
  echo "$(date +%T) end $name rc=$rc" >> "$results/progress.txt"
}
