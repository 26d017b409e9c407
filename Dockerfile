# syntax=docker/dockerfile:1
#
# Kiln images. TypeScript runs directly with tsx (no build step).
#
#   docker build --target node  -t kiln-node  .              # api and dispatcher
#   docker build --target agent -t kiln-agent .              # gpu-agent + Python worker (GPU deps)
#   docker build --target agent --build-arg GPU=0 -t kiln-agent-synthetic .   # synthetic backend only
#
# Each container's command is set by docker-compose.yml, e.g.
#   node --import tsx apps/api/src/main.ts
# tini is PID 1 and forwards SIGTERM to node, which drains and exits (docker stop / compose down).
# tini signals only its direct child (no -g): the agent must stop its Python worker itself after
# draining, so the worker must not get the SIGTERM directly.

ARG NODE_IMAGE=node:20-bookworm-slim

# ---------------------------------------------------------------------------------------------
# os: the Node runtime, tini, /app
FROM ${NODE_IMAGE} AS os
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENTRYPOINT ["/usr/bin/tini", "--"]

# ---------------------------------------------------------------------------------------------
# base: node_modules (cached until a package.json or the lockfile changes), then the source.
FROM os AS base
COPY package.json package-lock.json ./
COPY packages/contracts/package.json packages/contracts/
COPY packages/runtime/package.json packages/runtime/
COPY apps/api/package.json apps/api/
COPY apps/dispatcher/package.json apps/dispatcher/
COPY apps/gpu-agent/package.json apps/gpu-agent/
# the root postinstall runs this script; KILN_SKIP_PYTHON_SETUP=1 makes it a no-op here
# (the agent image builds its own venv below). devDependencies stay: tsx runs the code.
COPY scripts/setup-python.mjs scripts/
RUN KILN_SKIP_PYTHON_SETUP=1 npm ci --no-audit --no-fund \
 && npm cache clean --force
COPY . .
# state written at run time (agent work dirs, etc.); everything else stays read-only to `node`
RUN mkdir -p /app/.kiln && chown node:node /app/.kiln
ENV NODE_ENV=production

# ---------------------------------------------------------------------------------------------
# node: api and dispatcher (no Python). CMD is set per service in docker-compose.yml.
FROM base AS node
USER node
CMD ["node", "--import", "tsx", "apps/api/src/main.ts"]

# ---------------------------------------------------------------------------------------------
# python: the worker venv at /app/workers-py/.venv. Its own stage, so a source change does not
# reinstall torch: only the requirement files are copied here.
FROM os AS python
ARG GPU=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY workers-py/requirements.txt workers-py/requirements-diffusers.txt workers-py/
# torch and torchvision first, on their own, as scripts/setup-python.mjs does (see the file's header)
RUN python3 -m venv /app/workers-py/.venv \
 && /app/workers-py/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -r workers-py/requirements.txt \
 && if [ "$GPU" = "1" ]; then \
      /app/workers-py/.venv/bin/pip install --no-cache-dir --disable-pip-version-check \
        $(grep -E '^(torch|torchvision)==' workers-py/requirements-diffusers.txt) \
   && /app/workers-py/.venv/bin/pip install --no-cache-dir --disable-pip-version-check -r workers-py/requirements-diffusers.txt; \
    fi

# ---------------------------------------------------------------------------------------------
# agent: the gpu-agent and its Python worker. Same OS and Python as the `python` stage, so the
# venv's interpreter links stay valid; the app (node_modules + source) comes from `base`.
FROM python AS agent
COPY --from=base /app /app
# the Hugging Face cache (a volume in docker-compose.yml) and the agent's work dir, owned by node
RUN mkdir -p /cache/huggingface /app/.kiln/work \
 && chown -R node:node /cache /app/.kiln
ENV NODE_ENV=production \
    WORKER_PYTHON=/app/workers-py/.venv/bin/python \
    WORKER_DIR=/app/workers-py \
    WORK_DIR=/app/.kiln/work \
    HF_HOME=/cache/huggingface \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER node
CMD ["node", "--import", "tsx", "apps/gpu-agent/src/main.ts"]
