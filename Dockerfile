# CPU image by default; `--build-arg JAX=cuda12` installs the CUDA build of jax.
#   docker build -t loopicl .                      # CPU
#   docker build -t loopicl --build-arg JAX=cuda12 .
#   docker run --rm -v $PWD/runs:/app/runs loopicl python scripts/train.py --config configs/default.py --workdir runs/default
FROM python:3.11-slim
ARG JAX=cpu
WORKDIR /app
# g++ builds the fused CPU kernel (loopicl/kernels); without it runs fall back to plain XLA.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY . /app
# The same install script CI runs (.ci/run), into the image's own python.
RUN LOOPICL_VENV=none LOOPICL_JAX=${JAX} bash scripts/install.sh
CMD ["python", "-m", "pytest"]
