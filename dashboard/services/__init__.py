"""Everything the dashboard pages need from the engine, and nothing else: the only package importing `engine`.

Pages call these functions with plain values and get plain values back (dicts, lists, numpy arrays, pandas
frames). Engine errors become `UserError` (one specific message) or `DataProblems` (every validation problem with
its file), which the pages show with `st.error`; a stack trace never reaches the page.

One module per concern (the page that mostly uses it in brackets):

- `common`: paths, upload limits, `UserError` / `DataProblems`.
- `data`: the sample, uploads, server folders, counts and thumbnails (Data).
- `methods`: the registry as the pages see it, the device, run estimates (Train, Learn).
- `jobs`: the process-wide `JobManager` and a job's progress view (Train). Training runs in a worker process
  (`engine.worker`) by default, on a Ray cluster when ``ADLAB_RAY_ADDRESS`` is set, or in a thread for tests.
- `results`: the stored results of each dataset, written atomically as each method finishes, so a browser refresh
  or a second tab sees them (every results page).
- `curve`: the labelled-anomaly curve (Compare) and the "Is labelling worth it?" run (Train).
- `analysis`: metrics table with intervals, curves, per-defect table, thresholds, failure cases (Compare,
  Failures, Learn).
- `heatmaps`: stored anomaly maps and the Heatmaps page's panels.
- `try_images`: scoring new images with a kept model, model downloads (Try).
- `benchmark`: sweeps over datasets and seeds (Benchmark).
- `report`: the self-contained HTML report (Compare, Benchmark, ``adlab report``).

The most used names are re-exported here, so pages write ``services.metrics_table(results)``.
"""

from dashboard.services.analysis import (
    auroc_ci,
    base_rate,
    best_method,
    confusion_table,
    csv_bytes,
    curves,
    disagreements,
    failures,
    family_results,
    metrics_table,
    per_defect,
    speed_points,
    test_images,
    thresholds,
)
from dashboard.services.common import (
    BACKBONES,
    IMAGE_SIZES,
    JOB_ISOLATION,
    MAX_CONCURRENT_JOBS,
    MAX_UPLOAD_MB,
    ROOT,
    SAMPLE_ROOT,
    TILE_SIZES,
    UPLOAD_LIMITS,
    DataProblems,
    UserError,
    _user_error,
)
from dashboard.services.curve import CurvePlan, curve_plan, labelled_curve, start_curve
from dashboard.services.data import (
    DataInfo,
    counts_table,
    dataset_info,
    default_dataset_path,
    image_sizes,
    open_server_dataset,
    sample_categories,
    sample_path,
    save_upload,
    server_datasets,
    server_roots,
    thumbnails,
    upload_limits_text,
    working_shape,
)
from dashboard.services.heatmaps import DEFAULT_OPACITY, heatmap_panels, method_maps, test_image
from dashboard.services.jobs import Job, JobManager, MethodProgress, job_manager, job_view, run_estimate, start_run
from dashboard.services.methods import (
    check_config,
    default_image_size,
    default_methods,
    device_name,
    estimate_run,
    estimate_text,
    families,
    method_info,
    methods_by_family,
    weights_source,
)
from dashboard.services.results import (
    clear_results,
    geometry_text,
    latest_results,
    ok_runs,
    results_json,
    run_name,
    run_notes_text,
)

__all__ = [
    "BACKBONES", "CurvePlan", "DEFAULT_OPACITY", "DataInfo", "DataProblems", "IMAGE_SIZES", "JOB_ISOLATION", "Job",
    "JobManager", "MAX_CONCURRENT_JOBS", "MAX_UPLOAD_MB", "MethodProgress", "ROOT", "SAMPLE_ROOT", "TILE_SIZES",
    "UPLOAD_LIMITS", "UserError", "_user_error", "auroc_ci", "base_rate", "best_method", "check_config",
    "clear_results", "confusion_table", "counts_table", "csv_bytes", "curve_plan", "curves", "dataset_info",
    "default_dataset_path", "default_image_size", "default_methods", "device_name", "disagreements", "estimate_run",
    "estimate_text", "failures", "families", "family_results", "geometry_text", "heatmap_panels", "image_sizes",
    "job_manager", "job_view", "labelled_curve", "latest_results", "method_info", "method_maps", "methods_by_family",
    "metrics_table", "ok_runs", "open_server_dataset", "per_defect", "results_json", "run_estimate", "run_name",
    "run_notes_text", "sample_categories", "sample_path", "save_upload", "server_datasets", "server_roots",
    "speed_points", "start_curve", "start_run", "test_image", "test_images", "thresholds", "thumbnails",
    "upload_limits_text", "weights_source", "working_shape",
]
