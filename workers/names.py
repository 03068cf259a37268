"""The names a trial and a sweep write under, in one place: MLflow tags, metrics, artifacts, files.

Plain strings, standard library only: the driver and the workers both import this module without
pulling in MLflow, torch or Ray.
"""

from __future__ import annotations

# --- tags of a trial's run ------------------------------------------------------------------------------------
TRIAL_ID_TAG = "adaptune.trial_id"
STATUS_TAG = "adaptune.status"
ERROR_TAG = "adaptune.error"
ADAPTER_TAG = "adaptune.adapter"
RESUMED_TAG = "adaptune.resumed"
SKIPPED_CHECKPOINTS_TAG = "adaptune.skipped_checkpoints"
BRANCH_TAG = "adaptune.branch"
# A param whose value changed between attempts (MLflow keeps the first): the new value, as a tag.
CHANGED_PARAM_TAG = "adaptune.resumed_with."

# --- tags of a sweep's parent run -----------------------------------------------------------------------------
SWEEP_TAG = "adaptune.sweep"
GIT_SHA_TAG = "adaptune.git_sha"
# Set while the sweep's last `run` or `resume` ended before every trial did (Ctrl-C): how many, and what continues them.
INTERRUPTED_TAG = "adaptune.interrupted"

# --- MLflow's own tags ----------------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"
# The experiment tag MLflow's UI reads to open an experiment on its runs table, not on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
DATASET_CONTEXT_TAG = "mlflow.data.context"

# --- metrics --------------------------------------------------------------------------------------------------
ACCURACY_PREFIX = "accuracy/"
MACRO_ACCURACY = f"{ACCURACY_PREFIX}macro"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
TRAINABLE_PARAMS = "trainable_params"
BASE_PARAMS = "base_params"
GPU_HOURS = "gpu_hours"
CPU_HOURS = "cpu_hours"
PEAK_MEMORY_GB = "peak_memory_gb"
FINAL_TRAIN_LOSS = "final_train_loss"
TOKENS_TRAINED = "tokens_trained"
TRAIN_SECONDS = "train_seconds"

# --- artifacts of a trial's run and files of its folder -------------------------------------------------------
ADAPTER_ARTIFACT = "adapter"
PREDICTIONS_ARTIFACT = "predictions"
SPEC_ARTIFACT = "spec.yaml"
SUMMARY_FILE = "summary.json"
SPOOL = "tracking-spool"  # the tracking spool's folder in a trial's checkpoint directory

# --- artifacts of a sweep's parent run and files of its storage folder ---------------------------------------
REPORT_ARTIFACT = "report"
SUMMARY_CSV = "summary.csv"
SWEEP_FILE = "sweep.yaml"
HEARTBEAT = "driver.heartbeat"
