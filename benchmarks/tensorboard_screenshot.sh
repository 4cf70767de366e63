#!/usr/bin/env bash
# Screenshot TensorBoard's time-series (scalar) page for a logdir with headless Chromium.
# Usage: benchmarks/tensorboard_screenshot.sh LOGDIR OUT.png [PORT]
# Optional env: TAG_FILTER / RUN_FILTER (regexes applied by TensorBoard; all tags by default),
# BUDGET_MS (virtual time for the page's JavaScript), WIDTH (window width in px).
set -euo pipefail

if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 LOGDIR OUT.png [PORT]" >&2
  exit 2
fi
logdir=$(realpath -e "$1")
out=$(realpath -m "$2")
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"

if [[ ! -x /usr/bin/chromium ]]; then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  # Retry after refreshing the package lists: a stale list makes the first try fail.
  $sudo apt-get install -y -qq chromium >/dev/null \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; }
fi

# Let the OS pick a free port unless one is given.
port=${3:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

tmp=$(mktemp -d)
tb_pid=""
cleanup() {
  [[ -n $tb_pid ]] && kill "$tb_pid" 2>/dev/null && wait "$tb_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

"$repo/.venv/bin/tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" \
  >"$tmp/tensorboard.log" 2>&1 &
tb_pid=$!

# TensorBoard needs a few seconds to import; fail clearly if it dies or never answers.
base="http://127.0.0.1:$port"
deadline=$((SECONDS + 60))
until curl -fs -m 5 -o /dev/null "$base/data/runs"; do
  if ! kill -0 "$tb_pid" 2>/dev/null || ((SECONDS >= deadline)); then
    cat "$tmp/tensorboard.log" >&2
    echo "tensorboard exited or did not answer on $base within 60 s" >&2
    exit 1
  fi
  sleep 1
done

# The time-series dashboard reads its filters from the query string. A non-empty tag filter
# shows every matching card in one flat grid (without it, groups after the first two start
# collapsed). forceSVG draws the charts on the main thread: the default worker canvas is
# captured with axes but no lines.
tag_filter=${TAG_FILTER:-.}
run_filter=${RUN_FILTER:-}
quote() { "$py" -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }
url="$base/?darkMode=false&forceSVG=true&tagFilter=$(quote "$tag_filter")"
[[ -n $run_filter ]] && url+="&runFilter=$(quote "$run_filter")"
url+="#timeseries"

# The dashboard scrolls inside its own pane and only draws cards on screen, so the window must
# be tall enough for all of them. Waiting for the runs also keeps the page from loading before
# TensorBoard has read the event files.
width=${WIDTH:-1600}
height=$("$py" - "$base" "$width" "$tag_filter" "$run_filter" <<'PY'
import json, math, re, sys, time, urllib.request
base, width, tag_filter, run_filter = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
get = lambda path: json.load(urllib.request.urlopen(base + path, timeout=10))
def matching():
    return {(plugin, tag)
            for plugin in ("scalars", "images", "histograms")
            for run, tags in get(f"/data/plugin/{plugin}/tags").items() if re.search(run_filter, run)
            for tag in tags if re.search(tag_filter, tag)}
# TensorBoard loads a large logdir in the background: wait until the matching cards stop changing.
deadline, cards, before = time.time() + 60, set(), None
while time.time() < deadline and (not cards or cards != before):
    before, cards = cards, matching()
    time.sleep(2)
# Cards are at least 335 px wide plus a 16 px gap, about 440 px tall, 12 to a page; the run
# list and the settings pane take about 600 px of the width.
cols = max(1, (width - 600) // 351)
rows = math.ceil(min(12, len(cards)) / cols)
print(min(8000, max(1000, 250 + 440 * rows)))
PY
)

# The flags keep Chromium from calling home (the network is closed) and from needing a GPU or
# sandbox. Virtual time lets the single-page app fetch the data and draw before the capture;
# running every compositor stage per frame keeps that in step with virtual time (without it
# about a third of the captures showed empty cards).
mkdir -p "$(dirname "$out")"
rm -f "$out"
/usr/bin/chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$tmp/profile" --hide-scrollbars --run-all-compositor-stages-before-draw \
  --window-size="$width,$height" --virtual-time-budget="${BUDGET_MS:-20000}" \
  --screenshot="$out" "$url" >"$tmp/chromium.log" 2>&1 || true
[[ -s $out ]] || { cat "$tmp/chromium.log" >&2; echo "no screenshot written" >&2; exit 1; }
echo "$out"
