#!/usr/bin/env bash
# Fixed-rate load on POST /certify of a running certserve, by hand (the same measurement as the primary row of
# `certserve bench server --only http`): STREAMS hey processes with one connection each at RATE/STREAMS req/s,
# started 1/RATE s apart, so requests arrive evenly spaced at RATE req/s (a plain `hey -c N -q Q` starts all N
# workers' tickers together and sends bursts of N). Prints achieved rate, status codes and latency percentiles
# measured from each request's scheduled tick (no coordinated omission).
#
#   bench/load_http.sh http://127.0.0.1:8000 image.png [RATE=200] [SECONDS=25] [STREAMS=4] [FIELDS...]
#   e.g. bench/load_http.sh http://127.0.0.1:8000 shoe.png 200 25 4 mode=auto alpha=0.001
#
# Needs hey (Debian: apt-get install -y hey). Loopback / your own servers only.
set -euo pipefail
URL=${1:?usage: $0 URL IMAGE [RATE] [SECONDS] [STREAMS] [FIELD=VALUE...]}
IMAGE=${2:?usage: $0 URL IMAGE [RATE] [SECONDS] [STREAMS] [FIELD=VALUE...]}
RATE=${3:-200}
SECONDS_=${4:-25}
STREAMS=${5:-4}
shift $(( $# < 5 ? $# : 5 ))
command -v hey >/dev/null || { echo "hey not found: apt-get install -y hey" >&2; exit 1; }

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
B=certservebenchboundary7f3a
{
  for field in "$@"; do
    printf -- '--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' "$B" "${field%%=*}" "${field#*=}"
  done
  printf -- '--%s\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\nContent-Type: image/png\r\n\r\n' "$B"
  cat "$IMAGE"
  printf -- '\r\n--%s--\r\n' "$B"
} > "$WORK/body.bin"

PER=$(awk -v r="$RATE" -v s="$STREAMS" 'BEGIN { printf "%g", r / s }')
GAP=$(awk -v r="$RATE" 'BEGIN { printf "%.4f", 1 / r }')
pids=()
for i in $(seq 1 "$STREAMS"); do
  hey -z "${SECONDS_}s" -c 1 -q "$PER" -cpus 1 -m POST -T "multipart/form-data; boundary=$B" -D "$WORK/body.bin" \
      -o csv "$URL/certify" > "$WORK/hey-$i.csv" &
  pids+=($!)
  sleep "$GAP"
done
for pid in "${pids[@]}"; do wait "$pid"; done

# csv columns: response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
# hey measures from each request's send; a response slower than a stream's tick period delays its next send and
# drops the ticks in between (coordinated omission). As bench/server_common.py's intended_latencies: every tick of a
# stream gets the latency from the tick to the end of the first request sent at or after it (the tick lattice is
# fitted to the sends: send i is at or after tick i + 1). One line per tick: latency ms, status code, end offset.
TICK=$(awk -v q="$PER" 'BEGIN { printf "%.6f", int(1e6 / q) / 1e6 }')
for f in "$WORK"/hey-*.csv; do
  tail -n +2 "$f" | awk -F, -v P="$TICK" '{ s[NR] = $8; e[NR] = $8 + $1; c[NR] = $7 } END {
    if (NR == 0) exit
    tol = (P / 4 < 0.001) ? P / 4 : 0.001
    o = s[1] - P; for (i = 2; i <= NR; i++) if (s[i] - i * P < o) o = s[i] - i * P
    j = 1
    for (k = 1; o + k * P <= s[NR] + tol; k++) {
      t = o + k * P; while (j < NR && s[j] < t - tol) j++
      l = e[j] - t; if (l < e[j] - s[j]) l = e[j] - s[j]
      print l * 1000, (j in seen ? "-" : c[j]), e[j]; seen[j] = 1 } }'
done > "$WORK/all.txt"
awk '{ ticks++; if ($2 != "-") { n++; codes[$2]++ } if ($3 > span) span = $3 } END {
       printf "requests %d in %.1f s = %.1f req/s (%d ticks); status codes:", n, span, n / span, ticks
       for (c in codes) printf " %s x %d", c, codes[c]; printf "\n" }' "$WORK/all.txt"
sort -n "$WORK/all.txt" | awk '{ v[NR] = $1 } END {
       split("50 90 99 100", q, " ")
       printf "from the tick: "
       for (i = 1; i <= 4; i++) { k = int(NR * q[i] / 100 + 0.999999); if (k < 1) k = 1; if (k > NR) k = NR
                                  printf "p%s %.1f ms  ", q[i], v[k] }
       printf "\n" }'
