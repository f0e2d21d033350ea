#!/usr/bin/env bash
# A device run longer than one call (bench/README.md, "Runs longer than one call"): start it in the background,
# then have each call copy what it wrote into that call's $OUT until it ends.
#
#   bash bench/device/bg.sh start NAME CMD [ARGS...]   # CMD runs detached in the repository root; its output goes
#                                                      # to /tmp/pusa-bg/NAME/log and $BG_DIR names that folder
#   bash bench/device/bg.sh wait NAME SECONDS          # every 10 s copy /tmp/pusa-bg/NAME into $OUT (files up to
#                                                      # 16 MB), until CMD ended or SECONDS passed; exit 0 once
#                                                      # it ended (its status in /tmp/pusa-bg/NAME/rc), else 3
set -euo pipefail
cd "$(dirname "$0")/../.."
action=$1 name=$2
shift 2
dir=/tmp/pusa-bg/$name
case $action in
  start)
    mkdir -p "$dir"
    rm -f "$dir/rc"
    BG_DIR=$dir setsid nohup bash -c '"$@" > "$BG_DIR/log" 2>&1; echo $? > "$BG_DIR/rc"' bash "$@" \
      < /dev/null > /dev/null 2>&1 &
    echo "started $name (pid $!): $dir"
    ;;
  wait)
    : "${OUT:?wait copies into \$OUT}"
    deadline=$((SECONDS + $1))
    while :; do
      ended=0
      [[ -f $dir/rc ]] && ended=1
      (cd "$dir" && find . -type f -size -16M -print0 | xargs -0 -r cp --parents -t "$OUT")
      if ((ended)); then
        echo "$name ended with status $(cat "$dir/rc")"
        tail -n 5 "$dir/log"
        exit 0
      fi
      if ((SECONDS >= deadline)); then
        echo "$name still running"
        tail -n 5 "$dir/log"
        exit 3
      fi
      sleep 10
    done
    ;;
  *)
    echo "usage: bg.sh start NAME CMD [ARGS...] | bg.sh wait NAME SECONDS" >&2
    exit 2
    ;;
esac
