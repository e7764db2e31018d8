#!/bin/sh
# gpu-aot: installed as .venv-aot/.../nvidia/cuda_nvcc/bin/ptxas (the real one renamed ptxas.real).
# Adds -v (registers, spills, stack, smem) and, when PTXAS_KEEP_DIR is set, keeps every PTX input
# as N.ptx and ptxas' report as N.log there, for benchmarks/gpu_aot.py. Output streams unchanged.
real="$(dirname "$0")/ptxas.real"
case " $* " in *" --version "*) exec "$real" "$@";; esac
if [ -z "$PTXAS_KEEP_DIR" ]; then exec "$real" -v "$@"; fi
n="$PTXAS_KEEP_DIR/$$"
for a in "$@"; do
  case "$a" in -*) ;; *) [ -f "$a" ] && head -c 200 "$a" | grep -q "\.version" && cp "$a" "$n.ptx";; esac
done
"$real" -v "$@" >"$n.out" 2>"$n.err"
rc=$?
cat "$n.out"
cat "$n.err" >&2
cat "$n.out" "$n.err" >"$n.log"
rm -f "$n.out" "$n.err"
exit $rc
