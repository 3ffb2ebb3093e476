"""Every environment variable pdserve reads, in one list (this module imports nothing). Each is read once, where a
process or component starts, never per request; tunables are not here, they live in the typed configs.

- `PDSERVE_HOME` (`cluster.builtin_model`): where the built-in model is made (default ~/.cache/pdserve).
- `PDSERVE_API_KEY` (the router's `router.auth`, the SDK's `pdserve._request`): a public API key when none is given.
- `PDSERVE_CLUSTER_SECRET` (`cluster.secret`: launcher, workers, front ends): the cluster secret; a child process
  gets it here, never in argv.
- `PDSERVE_REDIS_PASSWORD` (the launcher, `cluster.registry`): the Redis password, apart from `redis_url` (a Helm
  Secret); the launcher puts it into the URL.
- `PDSERVE_KV_TRACE` (`cluster.kv_trace`, read when a transport opens): a directory, KV handoff tracing on.
- `PDSERVE_COMMIT` (`cluster.bench.report`): the commit of a tree copied without its history.
- `PROMETHEUS_MULTIPROC_DIR` (set by `pdserve up`, read by `router.metrics`): prometheus_client's multiprocess
  mode across router processes.
- `RAY_ADDRESS` (launcher, preflight): a Ray cluster to join, else a local Ray.
- `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES` (set by the launcher for cuda_ipc, read by the worker actor): the
  workers of a node see all its GPUs.
- `PYTORCH_CUDA_ALLOC_CONF` (launcher): transport "auto" picks cuda_ipc only without expandable segments.
- `OMP_NUM_THREADS` (worker actor): a CPU engine's threads.
"""

HOME = "PDSERVE_HOME"
API_KEY = "PDSERVE_API_KEY"
CLUSTER_SECRET = "PDSERVE_CLUSTER_SECRET"
REDIS_PASSWORD = "PDSERVE_REDIS_PASSWORD"
KV_TRACE = "PDSERVE_KV_TRACE"
COMMIT = "PDSERVE_COMMIT"
PROMETHEUS_MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
