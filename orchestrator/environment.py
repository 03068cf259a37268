"""The environment a Ray cluster started by `adaptune run` inherits, and the driver's while Tune runs.

The cluster's processes (and so every trial) get an allow-list of the driver's environment: what
trials need to find their tools, caches and threads, plus the credentials they genuinely use (the
tracking store's, the artifact store's, the Hugging Face hub's). Those are inherited in memory, which
Ray does not log; Ray does log every runtime env in clear (`runtime_env_agent.log`), and Tune copies
some variables of the driver (AWS_*) into the runtime env of each trial, so while Tune runs on a
cluster started here the driver holds no secret at all.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from workers.redaction import is_secret_key

# Variables kept by name, and by prefix (minus any whose name says it is a secret: HF_TOKEN, ...).
ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "CC", "CXX",
    "CUDA_HOME", "CUDA_PATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
})
ALLOWED_PREFIXES = ("ADAPTUNE_", "MLFLOW_", "HF_", "TRANSFORMERS_", "TORCH_", "PYTORCH_", "DS_", "NCCL_", "GLOO_",
                    "CUDA_", "NVIDIA_", "PYTHON", "LC_", "XDG_", "RAY_")
# Secrets that the cluster's processes use (trials: the stores', the hub's; Ray: its token): they inherit them.
CLUSTER_SECRETS = frozenset({
    "RAY_AUTH_TOKEN",
    "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_S3_ENDPOINT_URL",
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
})


def _secret(name: str) -> bool:
    return name in CLUSTER_SECRETS or is_secret_key(name)


def allowed(environ: Mapping[str, str]) -> dict[str, str]:
    """The allow-listed, non-secret part of `environ`."""
    return {k: v for k, v in environ.items()
            if (k in ALLOWED_NAMES or k.startswith(ALLOWED_PREFIXES)) and not _secret(k)}


def cluster_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """What the processes of a cluster started here inherit: the allow-list and the secrets they use."""
    return {**allowed(environ), **{k: v for k, v in environ.items() if k in CLUSTER_SECRETS}}


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's environment is `env` inside the block, and what it was after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def without_secrets(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` minus every variable that is, or is named like, a secret."""
    return {k: v for k, v in environ.items() if not _secret(k)}
