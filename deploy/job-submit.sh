#!/usr/bin/env bash
# The `ray job submit` recipe: start the saelect service on an existing Ray cluster.
#
#   RAY_DASHBOARD=http://HEAD:8265 SAELECT_API_TOKEN=... deploy/job-submit.sh [serve flags...]
#
# The job ships this repository (--working-dir .) with deploy/runtime-env.yaml: the service's
# pip dependencies, for a cluster on the plain rayproject/ray image. On a cluster running the
# saelect image, SAELECT_RUNTIME_ENV=deploy/runtime-env-image.yaml installs nothing. Its
# driver runs on the head node (no entrypoint resources), so the SelectionActor is pinned there
# and serves on the head's SAELECT_PORT (default 8000). SAELECT_API_TOKEN, when set here, is
# passed in the job's env_vars (readable by whoever can read the job's runtime env); leave it
# unset when the cluster's nodes already carry it. Extra arguments go to `saelect serve`
# (e.g. --store s3://bucket/saelect-store, --advertise-url https://saelect.example.com).
# The job id is printed; `ray job logs ID` shows the URL, `ray job stop ID` stops the service.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_DASHBOARD:?set RAY_DASHBOARD to the dashboard address of the head, e.g. http://HEAD:8265}"
runtime_env_file="${SAELECT_RUNTIME_ENV:-deploy/runtime-env.yaml}"
submission_id="${SAELECT_SUBMISSION_ID:-saelect-$(date +%Y%m%d-%H%M%S)}"

# the runtime env as JSON, with the token added when one is set
runtime_env_json="$(python -c '
import json, os, sys
import yaml
env = yaml.safe_load(open(sys.argv[1])) or {}
token = os.environ.get("SAELECT_API_TOKEN")
if token:
    env.setdefault("env_vars", {})["SAELECT_API_TOKEN"] = token
print(json.dumps(env))
' "$runtime_env_file")"

exec ray job submit --address "$RAY_DASHBOARD" --no-wait \
  --submission-id "$submission_id" \
  --working-dir . \
  --runtime-env-json "$runtime_env_json" \
  -- python -m saelect.service.cli serve --address auto --host 0.0.0.0 --port "${SAELECT_PORT:-8000}" "$@"
