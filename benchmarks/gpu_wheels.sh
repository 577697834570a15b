# Sourced by the GPU scripts: installs the wheels carried in .whl/ (Liger-Kernel; the GPU machine has torch and
# triton) into /tmp/site, without an index or dependencies, and puts them on PYTHONPATH; says so when none are here.
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no .whl/*.whl here: the liger arms will fail with 'liger-kernel is not installed'" >&2
fi
