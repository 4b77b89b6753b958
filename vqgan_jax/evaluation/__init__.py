"""Evaluation of trained workdirs: stage-1 reconstructions (`stage1`), stage-2 bits/token
and samples (`stage2`), and what both share (`common`: Inception features, checks, val
batches, FID/IS/KID plumbing, reference statistics, the results JSON).

`python -m vqgan_jax.eval` is the command over this package. The public API is
re-exported here (`evaluation.evaluate_stage1`, ...). Code that replaces a shared piece
(tests: `make_inception_feature_fn`, `inception_feature_dim`) patches it in
`vqgan_jax.evaluation.common`, where both evaluators look it up.
"""

from vqgan_jax.evaluation.common import (FID_SKIPPED_NO_WEIGHTS, FID_SKIPPED_NOT_RGB,
                                         INCEPTION_ENV, STAGES, EvalError, batch_setting,
                                         check_batch_size, check_stage, checkpoint_info,
                                         collect_features, compute_reference_stats,
                                         frechet_distance_from_features, gather,
                                         generated_image_metrics, inception_feature_dim,
                                         load_inception, load_reference_stats,
                                         make_inception_feature_fn,
                                         resolve_inception_weights, val_batches, write_json)
from vqgan_jax.evaluation.stage1 import evaluate_stage1, make_stage1_eval_step
from vqgan_jax.evaluation.stage2 import (Stage2Adapter, bits_per_token, evaluate_stage2,
                                         token_nll_sums)
