"""Training and evaluation input pipelines (tf.data) over psla_tf TFRecord shards.

Training (paper Algorithm 1, lines 1-15), per epoch e, ``sampling_order="iid"`` (default):

1. the epoch's ``N // batch_size * batch_size`` draws: with balanced sampling i.i.d. with
   P(i) = w_i / W (:mod:`psla_tf.data.sampling`; the weights from the record index's
   labels), otherwise a random permutation; and one uniform mixup partner per draw;
2. each drawn record is read at its byte offset (:mod:`psla_tf.data.record_index`), or
   looked up among the records of a set small enough to be held in memory
   (``records_in_memory_mb``), and parsed (:func:`psla_tf.data.records.parse_example`); the
   partner is read only when the example is mixed (:mod:`psla_tf.data.mixup`);
3. the waveform is cut or zero-padded to ``clip_samples`` (``num_samples`` keeps the valid
   length) and batched. Every input pipeline computes the same global draw and yields its
   replicas' slices of each global batch.

``sampling_order="stream"`` reads sequentially instead: the shard list (this pipeline's
share) is shuffled and interleaved, record i is emitted k_i ~ Poisson(N p_i) times into a
``shuffle_buffer`` shuffle, mixup takes its partners from a second shuffled traversal, and the
epoch is cut at exactly ``N // batch_size`` batches (a further independent draw follows if the
Poisson stream runs short). Its order is bursty (see docs/decisions.md, "Training order").

Every random number comes from stateless ops (or tf.data shuffles with explicit seeds)
derived from (seed, epoch, ...), so a given (seed, epoch) gives the same batches in any run:
resuming at ``initial_epoch`` after a kill continues exactly.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from psla_tf import compat, params
from psla_tf.data import records
from psla_tf.data import sampling
from psla_tf.data.mixup import mixup_example
from psla_tf.data.records import DataError, DataSpec, shard_counts

__all__ = ["DEFAULT_CLIP_SAMPLES", "make_train_dataset", "make_eval_dataset",
           "clip_samples_for_frames", "steps_per_epoch", "resolve_data",
           "READ_BUFFER_BYTES", "RECORDS_IN_MEMORY_MB", "records_fit_in_memory",
           "configure_input_host", "group_batch_rows"]

steps_per_epoch = sampling.steps_per_epoch
AUTOTUNE = tf.data.AUTOTUNE
READ_BUFFER_BYTES = 1 << 20  # per open shard (was 4 MB: more heap left per shard read)
MAX_DRAWS_PER_EPOCH = 100
RECORDS_IN_MEMORY_MB = params.RECORDS_IN_MEMORY_MB
_KEY_SHIFT = 32  # key = file_index * 2**32 + position in the file
_SALT_MAIN, _SALT_PARTNER, _SALT_MIX = 11, 12, 13
_SALT_GAIN = 14
_SALT_IID = 15
# The dataset functions hold no Python control flow on tensors: skipping AutoGraph's source
# conversion roughly halves the time to build the (nested) training dataset.
_nag = tf.autograph.experimental.do_not_convert


def _seed_independent(fn):
    """``fn`` run as if no global TF seed were set
    (:func:`psla_tf.compat.independent_of_global_seed`).

    Every shuffle here takes an explicit seed derived from ``seed`` (and the epoch), so a
    global seed (``tf.random.set_seed`` / ``keras.utils.set_random_seed``) would only change
    the streams from one caller to the next; worse, a global seed of 0 makes TF's
    ``random_seed.get_seed`` compare our tensor-valued op seed with 0 in Python, which fails.
    The dataset functions are traced while the datasets are built, so clearing the seed for
    that time is enough.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with compat.independent_of_global_seed():
            return fn(*args, **kwargs)
    return wrapper


# glibc mallopt parameters (malloc.h) and configure_input_host's values
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_HEAP_REUSE = ((_M_MMAP_THRESHOLD, 64 << 20), (_M_TRIM_THRESHOLD, 256 << 20),
               (_M_TOP_PAD, 64 << 20))


def configure_input_host() -> bool:
    """Set up this process for an input pipeline that computes features clip by clip
    (``make_train_dataset(features_in_pipeline=True)``) on a host that does little else, e.g.
    one that feeds an accelerator. Call it before TensorFlow runs anything.

    * TensorFlow's intra-op pool at one thread: tf.data runs several clips at once, and with
      the default pool every op of each would also be split over all cores, the clips' ops
      then waiting on each other's shards;
    * glibc's allocator keeps freed buffers below 64 MiB for reuse (``mallopt``: mmap
      threshold 64 MiB, trim threshold 256 MiB, top pad 64 MiB) instead of mapping fresh,
      zeroed pages for every 10-s clip's ~0.3-2 MB intermediates.

    Together 1.09-1.29x the clips/s of TensorFlow's and glibc's defaults with fbank and
    masking on 2 cores, for 150-210 MB more peak RSS (docs/performance.md, "One thread per op,
    clips in parallel"). Not for a process that trains on the CPU: the
    model's batched ops need the intra-op pool. Returns whether the allocator settings were
    applied (False where the C library is not glibc)."""
    tf.config.threading.set_intra_op_parallelism_threads(1)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in _HEAP_REUSE)


def clip_samples_for_frames(frames: int = params.TARGET_LENGTH) -> int:
    """Samples that give exactly ``frames`` Kaldi frames: (frames - 1) * 160 + 400."""
    return (frames - 1) * params.FRAME_SHIFT + params.FRAME_LENGTH


DEFAULT_CLIP_SAMPLES = clip_samples_for_frames(params.TARGET_LENGTH)  # 169360


def resolve_data(data: str | DataSpec) -> DataSpec:
    """A DataSpec from a shard glob (or the DataSpec itself)."""
    return data if isinstance(data, DataSpec) else records.load_data_spec(data)


def example_key_parts(key: np.ndarray | int) -> tuple[np.ndarray, np.ndarray]:
    """(file index into spec.files, record position in the file) of a pipeline ``key``."""
    key = np.asarray(key, np.int64)
    return key >> _KEY_SHIFT, key & ((1 << _KEY_SHIFT) - 1)


# ----------------------------------------------------------------------------- reading
class _Reader:
    """Reads shards by index, checking every shard yields its manifest count of records.

    TFRecordDataset's DataLossError names no file, so each shard is read with
    ``ignore_errors`` (stopping at the first bad record) and the number of records read is
    compared with the manifest: a mismatch raises InvalidArgumentError whose message names the
    shard ("corrupt or truncated TFRecord shard <path>: read r of n records"), or, with
    ``skip_corrupt=True``, prints that line to stderr and goes on with the records read.
    """

    def __init__(self, spec: DataSpec, skip_corrupt: bool = False,
                 record_shard: tuple[int, int] | None = None):
        self.files = tf.constant(spec.files)
        self.expected = tf.constant(shard_counts(spec))
        self.compression = spec.compression or ""
        self.skip_corrupt = skip_corrupt
        self.record_shard = record_shard

    def __call__(self, file_index: tf.Tensor) -> tf.data.Dataset:
        """(key int64, serialised record) of one shard, in file order."""
        file_index = tf.cast(file_index, tf.int64)
        fname = tf.gather(self.files, file_index)
        expected = tf.gather(self.expected, file_index)
        raw = tf.data.TFRecordDataset(fname, compression_type=self.compression,
                                      buffer_size=READ_BUFFER_BYTES).ignore_errors()
        sentinel = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), tf.constant(b"")))
        ds = raw.enumerate().concatenate(sentinel)
        skip_corrupt = self.skip_corrupt

        def check(pos, rec, count):
            # count = records seen before this element; at the sentinel: all records read
            ok = tf.logical_or(pos >= 0, tf.equal(count, expected))
            if skip_corrupt:
                msg = tf.cond(ok, lambda: tf.constant(True), lambda: _warn(fname, count, expected))
                with tf.control_dependencies([msg]):
                    return tf.identity(pos), rec
            assert_op = tf.debugging.Assert(
                ok, ["corrupt or truncated TFRecord shard", fname, "read", count,
                     "of", expected, "records listed in its manifest"], summarize=1)
            with tf.control_dependencies([assert_op]):
                return tf.identity(pos), rec

        ds = ds.scan(tf.constant(0, tf.int64),
                     _nag(lambda c, el: (c + 1, check(el[0], el[1], c))))
        ds = ds.filter(_nag(lambda pos, rec: pos >= 0))
        if self.record_shard is not None:
            n, i = self.record_shard
            ds = ds.filter(_nag(lambda pos, rec: tf.equal(pos % n, i)))
        return ds.map(_nag(lambda pos, rec: (file_index * (1 << _KEY_SHIFT) + pos, rec)))


# shard path → (records read, records listed) of every corrupt shard skipped in this process
# (``skip_corrupt_records``); the trainer reports it and writes it into summary.json.
CORRUPT_SHARDS: dict[str, tuple[int, int]] = {}


def _record_corrupt(fname, count, expected) -> bool:
    name = fname.decode() if isinstance(fname, bytes) else str(fname)
    first = name not in CORRUPT_SHARDS
    CORRUPT_SHARDS[name] = (int(count), int(expected))
    if first:
        logging.warning("corrupt or truncated TFRecord shard %s: read %d of %d records; "
                        "skipping the rest (--skip_corrupt_records)", name, count, expected)
    return True


def corrupt_summary() -> dict[str, Any]:
    """Shards skipped so far: ``{"shards": {path: [read, listed]}, "records_lost": n}``."""
    return {"shards": {k: list(v) for k, v in sorted(CORRUPT_SHARDS.items())},
            "records_lost": int(sum(e - r for r, e in CORRUPT_SHARDS.values()))}


def _warn(fname, count, expected):
    op = tf.print("WARNING: corrupt or truncated TFRecord shard", fname, "read", count, "of",
                  expected, "records listed in its manifest; skipping the rest",
                  output_stream=sys.stderr)
    counted = tf.numpy_function(_record_corrupt, [fname, count, expected], tf.bool,
                                stateful=True)
    with tf.control_dependencies([op, counted]):
        return tf.constant(True)


def _labels_only(rec: tf.Tensor, num_classes: int) -> tf.Tensor:
    ex = tf.io.parse_single_example(rec, {"labels": records.FEATURE_SPEC["labels"]})
    return records.labels_to_multi_hot(tf.sparse.to_dense(ex["labels"]), num_classes)


def _traversal(reader: _Reader, file_ids: np.ndarray, seed: tf.Tensor, cycle_length: int
               ) -> tf.data.Dataset:
    """(key, record) of the given shards, shard order shuffled by ``seed``, interleaved."""
    files = tf.data.Dataset.from_tensor_slices(tf.constant(file_ids, tf.int64))
    files = files.shuffle(len(file_ids), seed=sampling.seed_to_int(seed),
                          reshuffle_each_iteration=False)
    # Dataset.interleave leaves the shards opened ahead (prefetch_input_elements) and the
    # records buffered per shard to autotuning: the open shards, each with its
    # READ_BUFFER_BYTES buffer, grew with the number of shards (pipeline alone: peak RSS
    # +392 vs +113 MB, 80 vs 8 shards of 20-s clips). Bounded: cycle_length shards open, one record
    # buffered each, so memory depends on the flags, not the set (issue 7).
    return compat.bounded_interleave(
        files, _nag(reader), min(cycle_length, len(file_ids)), 1, AUTOTUNE,
        buffer_output_elements=1, prefetch_input_elements=0, deterministic=True)


# (parsed example, serialised record) → example: labels into the model's vocabulary, teacher
# targets (psla_tf.data.teacher.ExampleTargets); applied right after parsing, before mixup
Transform = Callable[[dict, tf.Tensor], dict]


def _parse(key: tf.Tensor, rec: tf.Tensor, num_classes: int,
           transform: Transform | None = None) -> dict[str, tf.Tensor]:
    ex = records.parse_example(rec, num_classes)
    ex["key"] = key
    return ex if transform is None else transform(ex, rec)


def _pad_or_cut(ex: dict[str, tf.Tensor], clip_samples: int) -> dict[str, tf.Tensor]:
    x = ex["waveform"][:clip_samples]
    n = tf.shape(x)[0]
    out = dict(ex)
    out["waveform"] = tf.ensure_shape(tf.pad(x, [[0, clip_samples - n]]), [clip_samples])
    out["num_samples"] = tf.cast(n, tf.int32)
    return out


def _format(ex: dict[str, tf.Tensor], with_ids: bool, id_keys: tuple[str, ...]):
    feats = {"waveform": ex["waveform"], "num_samples": ex["num_samples"]}
    if with_ids:
        for k in id_keys:
            feats[k] = ex[k]
    if "teacher" in ex:  # distillation targets [2C + 2] (teacher.ExampleTargets)
        return feats, tf.concat([ex["labels"], ex["teacher"], ex["has_teacher"][tf.newaxis],
                                 ex["has_labels"][tf.newaxis]], 0)
    return feats, ex["labels"]


def _clip_element(clip_samples: int, with_ids: bool, keep: tuple[str, ...],
                  frontend: Callable | None) -> Callable:
    """example → the element one clip contributes to a batch (before batching).

    Without ``frontend``: ``({"waveform": [clip_samples], "num_samples": [], *keep}, labels)``,
    the waveform cut or zero-padded. With it (``features_in_pipeline``): ``({"fbank": [T, M],
    *keep}, labels)``, ``frontend(waveform [1, n], num_samples [1]) → [1, T, M]`` applied to
    the clip cut to ``clip_samples`` but not padded — the front end pads its frames itself
    (``AudioFrontend`` zeroes the frames past the clip and pads to ``T``), so no padded copy
    of the waveform is made and no fbank of the padding is computed (6-15 % less CPU per 10-s
    clip than the padded 1056-frame input, the same values within float32 rounding:
    benchmarks/per_clip_frontend.py).
    Per clip, before batching, as the reference: 1.48x the clips/s of one vectorised call
    per batch of 100 on 2 quiet CPU cores (1.16x loaded), at half the peak RSS
    (docs/performance.md, "Per clip vs vectorised after batch").
    """
    def element(ex):
        if frontend is None:
            return _format(_pad_or_cut(ex, clip_samples), with_ids, keep)
        x = ex["waveform"][:clip_samples]
        n = tf.shape(x)[0]
        feats, labels = _format(dict(ex, num_samples=n), with_ids, keep)
        fb = frontend(x[tf.newaxis], n[tf.newaxis])
        out = {"fbank": fb[0]}
        out.update((k, feats[k]) for k in keep if k in feats)
        return out, labels
    return element


def _or_fail_when_exhausted(ds: tf.data.Dataset, what: str) -> tf.data.Dataset:
    """Append an element that raises: reached only if ``ds`` ends before ``take`` stops."""
    def zeros(spec):
        return tf.zeros(spec.shape, spec.dtype)
    filler = tf.data.Dataset.from_tensors(tf.nest.map_structure(zeros, ds.element_spec))

    def fail(*el):
        op = tf.debugging.Assert(tf.constant(False), [what])
        with tf.control_dependencies([op]):
            return tf.nest.map_structure(tf.identity, el if len(el) > 1 else el[0])
    return ds.concatenate(filler.map(_nag(fail)))


# ----------------------------------------------------------------------------- training
SAMPLING_ORDERS = ("iid", "stream")


def _check_train_args(spec: DataSpec, batch_size: int, clip_samples: int | None,
                      sampling_order: str, mixup: float, mixup_alpha: float,
                      shuffle_buffer: int, random_gain_db: float, random_speed: float,
                      noise_prob: float, noise_snr_db: tuple[float, float],
                      noise_decay_db: tuple[float, float], features_in_pipeline: bool, frontend: Callable | None
                      ) -> tuple[int, int]:
    """:func:`make_train_dataset`'s arguments checked → (clip_samples, steps per epoch)."""
    if sampling_order not in SAMPLING_ORDERS:
        raise ValueError(f"sampling_order must be one of {SAMPLING_ORDERS}, got "
                         f"{sampling_order!r}")
    if random_gain_db < 0:
        raise ValueError(f"random_gain_db must be >= 0, got {random_gain_db}")
    if not 0 <= random_speed < 1:
        raise ValueError(f"random_speed must be in [0, 1), got {random_speed}")
    if not 0 <= noise_prob <= 1:
        raise ValueError(f"noise_prob must be in [0, 1], got {noise_prob}")
    if noise_snr_db[1] < noise_snr_db[0]:
        raise ValueError(f"noise_snr_db must be (low, high) with low <= high, got "
                         f"{noise_snr_db}")
    if not 0 <= noise_decay_db[0] <= noise_decay_db[1]:
        raise ValueError(f"noise_decay_db must be (low, high) with 0 <= low <= high, got "
                         f"{noise_decay_db}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0.0 <= mixup <= 1.0:
        raise ValueError(f"mixup rate must be in [0, 1], got {mixup}")
    if mixup > 0 and mixup_alpha <= 0:
        raise ValueError(f"mixup_alpha must be positive, got {mixup_alpha}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    if features_in_pipeline and frontend is None:
        raise ValueError("features_in_pipeline=True needs a frontend "
                         "(a callable (waveform, num_samples) -> fbank)")
    if features_in_pipeline and (random_gain_db > 0 or random_speed > 0 or noise_prob > 0):
        raise ValueError("the waveform augmentations (random_gain_db, random_speed, "
                         "noise_prob) act on waveforms: not with features_in_pipeline=True")
    clip_samples = DEFAULT_CLIP_SAMPLES if clip_samples is None else int(clip_samples)
    if clip_samples <= 0:
        raise ValueError(f"clip_samples must be positive, got {clip_samples}")
    n_total = int(spec.num_examples)
    steps = steps_per_epoch(n_total, batch_size)
    if steps == 0:
        raise DataError(f"{n_total} training examples give no full batch of {batch_size}; "
                        "lower --batch_size")
    return clip_samples, steps


def _pipeline_share(batch_size: int, input_context: tf.distribute.InputContext | None
                    ) -> tuple[int, int, int, int]:
    """This input pipeline's share of the global batches: (pipeline id, pipelines, per-replica
    batch, replicas it feeds in turn)."""
    if input_context is None:
        return 0, 1, batch_size, 1
    npipe = input_context.num_input_pipelines
    return (input_context.input_pipeline_id, npipe,
            input_context.get_per_replica_batch_size(batch_size),
            max(1, input_context.num_replicas_in_sync // npipe))


def _waveform_augmentations(batches: tf.data.Dataset, seed: tf.Tensor, random_gain_db: float,
                            random_speed: float, noise_prob: float,
                            noise_snr_db: tuple[float, float],
                            noise_decay_db: tuple[float, float]) -> tf.data.Dataset:
    """Each batch's waveforms at a random rate in [1 ± random_speed], with noise at
    U[noise_snr_db] dB SNR (white, or falling by U[noise_decay_db] dB per octave) on a
    noise_prob share of the clips, then scaled by a random gain of ±random_gain_db dB
    (:mod:`psla_tf.augment`; not in PSLA), seeded per batch."""
    from psla_tf.augment import random_gain, random_noise
    from psla_tf.augment import random_speed as speed_fn

    def gain(index, batch):
        feats, labels = batch
        s = sampling.derive_seed(seed, index)
        w, n = speed_fn(feats["waveform"], feats["num_samples"], random_speed,
                        sampling.derive_seed(s, 1))
        w = random_noise(w, n, noise_snr_db, noise_prob, sampling.derive_seed(s, 2),
                         noise_decay_db)
        w = random_gain(w, random_gain_db, s)
        return dict(feats, waveform=w, num_samples=n), labels
    return batches.enumerate().map(_nag(gain))


@_seed_independent
def make_train_dataset(data: str | DataSpec, *, batch_size: int = 100,
                       clip_samples: int | None = None, balanced_sampling: bool = True,
                       mixup: float = params.MIXUP, mixup_alpha: float = params.MIXUP_ALPHA,
                       sampling_order: str = "iid", group_batches: bool = False,
                       shuffle_buffer: int = 1000, seed: int = 0, initial_epoch: int = 0,
                       num_epochs: int = 1, random_gain_db: float = 0.0,
                       random_speed: float = 0.0, noise_prob: float = 0.0,
                       noise_decay_db: tuple[float, float] = (0.0, 0.0),
                       noise_snr_db: tuple[float, float] = (params.NOISE_SNR_MIN_DB,
                                                            params.NOISE_SNR_MAX_DB),
                       input_context: tf.distribute.InputContext | None = None,
                       features_in_pipeline: bool = False, frontend: Callable | None = None,
                       with_ids: bool = False, skip_corrupt_records: bool = False,
                       cycle_length: int = 8, num_parallel_calls: int = AUTOTUNE,
                       prefetch: int = AUTOTUNE, transform: Transform | None = None,
                       records_in_memory_mb: float = RECORDS_IN_MEMORY_MB
                       ) -> tf.data.Dataset:
    """The training stream (Algorithm 1 lines 1-15) for epochs initial_epoch..+num_epochs-1.

    Yields exactly ``steps_per_epoch(N, batch_size)`` batches per epoch, each
    ``({"waveform": [B, clip_samples] float32, "num_samples": [B] int32}, labels [B, C])``
    (``{"fbank": [B, T, 128]}`` instead when ``features_in_pipeline``: ``frontend(waveform
    [1, n], num_samples [1]) → [1, T, 128]`` per clip, on the clip cut to ``clip_samples``
    but not padded, as ``AudioFrontend``; B is the per-replica batch under
    ``input_context``; on a host that only feeds the pipeline call
    :func:`configure_input_host` first). ``with_ids`` adds ``id`` (string),
    ``key`` (int64: file index * 2**32 + record position, see :func:`example_key_parts`),
    ``partner_key`` (-1 when not mixed), ``partner_id`` ("" when not mixed) and
    ``mix_lambda`` (1 when not mixed) to the features.

    ``sampling_order``: ``"iid"`` (default, the reference's order: N i.i.d. draws per epoch
    and i.i.d. partners, records read at their offsets; uncompressed shards) or ``"stream"``
    (sequential reading through a ``shuffle_buffer`` shuffle; works on GZIP shards) — see
    the module doc and docs/decisions.md, "Training order".

    ``group_batches`` (i.i.d. order only; not in PSLA, off by default): every global batch
    is drawn from one prepared set (one shard prefix, e.g. one speaker's ``fold_{g}`` set of
    ``tools/cross_validate.py``), so BatchNorm's batch statistics are one group's, as when
    the trained model's statistics are adapted to one new group
    (:func:`group_batch_rows`; the clips' marginal probabilities are unchanged).

    ``transform`` (:class:`psla_tf.data.teacher.ExampleTargets`) is applied to every parsed
    example, partners included, before mixup: it may map the labels into another vocabulary
    and add ``teacher`` [C] / ``has_teacher`` [] / ``has_labels`` []; with a teacher (or a
    labelled subset) the labels of each batch are ``[B, 2C + 2]`` = (labels, mixed teacher
    targets, has_teacher, has_labels), mixed with the same λ
    (:func:`psla_tf.data.mixup.mixup_example`). It draws no random numbers: the order and
    the mixing are those of the same call without it. Balanced sampling weighs a clip
    outside the transform's ``labelled_keys`` (the unlabelled transfer set) by the mean
    weight of the labelled clips, whose labels alone give the class counts.

    ``records_in_memory_mb``: the i.i.d. order reads every training record once and keeps
    them in memory when they total at most this many MB (and a quarter of the free memory;
    :func:`records_fit_in_memory`); each draw is then a table lookup instead of a read at
    the record's offset, with the same records, so the same batches. 0: always read.

    Epochs are counted from 0 as in Keras' ``initial_epoch``. ``random_gain_db`` > 0 scales
    each training waveform by a random gain of ±random_gain_db dB after mixup
    (:func:`psla_tf.augment.random_gain`; not in PSLA, off by default); ``random_speed`` > 0
    plays each at a random rate in [1 - random_speed, 1 + random_speed]
    (:func:`psla_tf.augment.random_speed`; also not in PSLA, off by default);
    ``noise_prob`` > 0 adds noise at an SNR U[``noise_snr_db``] dB to that share of the
    clips, after the speed change and before the gain, white or, with ``noise_decay_db``
    above (0, 0), falling by U[``noise_decay_db``] dB per octave
    (:func:`psla_tf.augment.random_noise`; not in PSLA, off by default).
    """
    spec = resolve_data(data)
    clip_samples, steps = _check_train_args(
        spec, batch_size, clip_samples, sampling_order, mixup, mixup_alpha, shuffle_buffer,
        random_gain_db, random_speed, noise_prob, noise_snr_db, noise_decay_db,
        features_in_pipeline,
        frontend)
    if group_batches and sampling_order != "iid":
        raise ValueError("group_batches needs sampling_order='iid'")

    pid, npipe, per_batch, replicas_per_pipeline = _pipeline_share(batch_size, input_context)
    base_seed = tf.constant([int(seed), 0x5053_4C41], tf.int64)
    plan = _EpochPlan(steps, per_batch, replicas_per_pipeline, pid, npipe, batch_size)
    if sampling_order == "iid":
        examples = _iid_examples(spec, plan, base_seed, balanced_sampling, mixup, mixup_alpha,
                                 skip_corrupt_records, num_parallel_calls, transform,
                                 records_in_memory_mb, group_batches)
    else:
        examples = _stream_examples(spec, plan, base_seed, balanced_sampling, mixup,
                                    mixup_alpha, shuffle_buffer, skip_corrupt_records,
                                    cycle_length, num_parallel_calls, transform)
    per_clip = _clip_element(clip_samples, with_ids,
                             ("id", "key", "partner_key", "partner_id", "mix_lambda"),
                             frontend if features_in_pipeline else None)

    def epoch_dataset(epoch):
        main = examples(epoch).map(_nag(per_clip), num_parallel_calls=num_parallel_calls,
                                   deterministic=True)
        batches = main.batch(per_batch, drop_remainder=True)
        n_batches = steps * replicas_per_pipeline
        if sampling_order == "stream":
            batches = _or_fail_when_exhausted(
                batches, f"input pipeline ran out of examples before {n_batches} batches "
                         f"in {MAX_DRAWS_PER_EPOCH} draws (do the examples have labels?)")
        batches = batches.take(n_batches)
        if random_gain_db > 0 or random_speed > 0 or noise_prob > 0:
            gain_seed = sampling.derive_seed(base_seed, _SALT_GAIN, epoch, pid)
            batches = _waveform_augmentations(batches, gain_seed, random_gain_db,
                                              random_speed, noise_prob, noise_snr_db,
                                              noise_decay_db)
        return batches

    epochs = tf.data.Dataset.range(int(initial_epoch), int(initial_epoch) + int(num_epochs))
    ds = epochs.flat_map(_nag(epoch_dataset))
    return _finish(ds, prefetch)


class _EpochPlan:
    """Which of an epoch's steps * batch_size draws this input pipeline yields, in order.

    Global batch s holds draws [s*B, (s+1)*B); its per-replica batches are consecutive
    blocks of ``per_batch``; pipeline ``pid`` feeds replicas pid*rpp .. (pid+1)*rpp - 1 in
    turn, so across pipelines every draw is used exactly once.
    """

    def __init__(self, steps: int, per_batch: int, rpp: int, pid: int, npipe: int,
                 batch_size: int):
        self.steps, self.per_batch, self.rpp = steps, per_batch, rpp
        self.pid, self.npipe, self.batch_size = pid, npipe, batch_size
        self.draws = steps * batch_size          # the epoch's draws (all pipelines)

    def positions(self) -> tf.Tensor:
        """Global draw positions (int64) of this pipeline's elements, in its order."""
        block = self.rpp * self.per_batch
        if block * self.npipe != self.batch_size:
            raise ValueError(f"batch {self.batch_size} does not split into {self.npipe} "
                             f"pipelines x {self.rpp} replicas x {self.per_batch}")
        pos = tf.range(self.draws, dtype=tf.int64)
        return tf.reshape(tf.reshape(pos, [self.steps, self.npipe, block])[:, self.pid], [-1])


def _register_corrupt(bad) -> None:
    """Shards found short while indexing (``skip_corrupt_records``): counted and logged."""
    for c in bad:
        CORRUPT_SHARDS[c.path] = (int(c.read), int(c.listed))
        print(f"WARNING: {c.message()}; skipping the rest (--skip_corrupt_records)",
              file=sys.stderr, flush=True)


def _random_access_index(spec: DataSpec, skip_corrupt: bool):
    """The training shards' record index (``record_index.RecordIndex``), checked for the
    random-access reads of the i.i.d. order."""
    from psla_tf.data import record_index
    index = record_index.load_record_index(spec, skip_corrupt=skip_corrupt)
    _register_corrupt(index.corrupt)
    if not index.random_access:
        raise DataError(f"{spec.files[0]}: GZIP-compressed shards cannot be read at random "
                        "offsets, which the i.i.d. sampling order needs; prepare the shards "
                        "without --compression, or pass --sampling_order=stream (sequential "
                        "reading, bursty order: see docs/decisions.md)")
    if index.num_records == 0:
        raise DataError(f"no readable training record in {spec.files[0]}...")
    return index


def _row_sampler(index, class_counts: np.ndarray, balanced: bool, draws: int,
                 labelled: np.ndarray | None = None, group_batch: int | None = None
                 ) -> Callable[[tf.Tensor], tf.Tensor]:
    """epoch seed → the epoch's ``[draws]`` record rows (int64).

    Balanced: Algorithm 1 line 8, ``draws`` i.i.d. draws with replacement, P(i) = w_i / W;
    with a ``labelled`` row mask (bool [R]) the class counts are the labelled rows' and an
    unlabelled row weighs the labelled rows' mean weight (its labels are not used).
    Otherwise every record once per epoch in random order (more than one permutation only
    when skipped corrupt records made the set smaller than ``draws``). ``group_batch``: the
    same, each block of that many draws from one shard prefix (:func:`group_batch_rows`).
    """
    n_rec = index.num_records
    weights = None
    if balanced:
        weights = (index.sampling_weights(class_counts) if labelled is None
                   else _transfer_set_weights(index, labelled))
        if float(weights.sum()) <= 0:
            raise DataError("balanced sampling: no training example has a label")
    if group_batch:
        groups = np.unique([records.shard_prefix(f) for f in index.files],
                           return_inverse=True)[1]
        return group_batch_rows(groups[index.file_index], draws // group_batch, group_batch,
                                weights)
    if not balanced:
        perms = -(-draws // n_rec)

        def permuted(s):
            return tf.concat([tf.random.experimental.stateless_shuffle(
                tf.range(n_rec, dtype=tf.int64), seed=sampling.derive_seed(s, 0, r))
                for r in range(perms)], 0)[:draws]
        return permuted
    w = weights
    total = float(w.sum())
    cdf = tf.constant(np.cumsum(w), tf.float64)
    last = int(np.flatnonzero(w > 0)[-1])

    def weighted(s):
        u = tf.random.stateless_uniform([draws], seed=sampling.derive_seed(s, 0),
                                        dtype=tf.float64) * total
        return tf.minimum(tf.searchsorted(cdf, u, side="right", out_type=tf.int64), last)
    return weighted


def group_batch_rows(groups: np.ndarray, steps: int, batch_size: int,
                     weights: np.ndarray | None = None) -> Callable[[tf.Tensor], tf.Tensor]:
    """epoch seed → ``[steps * batch_size]`` rows (int64) whose every block of ``batch_size``
    comes from one group (``groups``: int [R], the group of each row).

    Without ``weights``: each group's rows in random order (its last block completed from a
    second permutation) cut into blocks, the blocks shuffled and the first ``steps`` kept,
    so a clip is used at most twice an epoch (e.g. 4 groups of 500 at batch 16: 128 blocks,
    125 kept). With ``weights`` (float [R], Algorithm 1's w_i): each block's group drawn with
    P(g) = W_g / W, then its rows i.i.d. with P(i | g) = w_i / W_g: every clip keeps
    P(i) = w_i / W. Not in PSLA: per-group batches make BatchNorm's training statistics
    those of one group (one speaker), as AdaBN's are on a new group (docs/decisions.md).
    """
    groups = np.asarray(groups)
    ids = np.unique(groups)
    members = [np.flatnonzero(groups == g) for g in ids]
    if weights is None:
        blocks = sum(-(-len(m) // batch_size) for m in members)
        if blocks < steps:
            raise DataError(f"{blocks} one-group batches of {batch_size} for {steps} steps")

        def permuted(s):
            per_group = []
            for k, m in enumerate(members):
                n_b = -(-len(m) // batch_size)
                rows = tf.constant(m, tf.int64)
                perms = [tf.random.experimental.stateless_shuffle(
                    rows, seed=sampling.derive_seed(s, 0, k, r))
                    for r in range(-(-n_b * batch_size // len(m)))]
                per_group.append(tf.reshape(tf.concat(perms, 0)[:n_b * batch_size],
                                            [n_b, batch_size]))
            order = tf.random.experimental.stateless_shuffle(
                tf.range(blocks, dtype=tf.int64), seed=sampling.derive_seed(s, 2))
            return tf.reshape(tf.gather(tf.concat(per_group, 0), order[:steps]), [-1])
        return permuted
    order = np.concatenate(members)                     # rows sorted by group
    w = np.asarray(weights, np.float64)[order]
    cdf = np.cumsum(w)
    ends = np.cumsum([len(m) for m in members]) - 1     # each group's last sorted position
    group_w = np.array([w[e - len(m) + 1:e + 1].sum() for m, e in zip(members, ends)])
    starts = cdf[ends] - group_w                        # cdf before each group
    last = np.array([e - len(m) + 1 + np.flatnonzero(w[e - len(m) + 1:e + 1] > 0)[-1]
                     if gw > 0 else e for m, e, gw in zip(members, ends, group_w)])
    total = float(group_w.sum())
    group_cdf, cdf_t = tf.constant(np.cumsum(group_w)), tf.constant(cdf)
    starts_t, group_w_t = tf.constant(starts), tf.constant(group_w)
    last_t, order_t = tf.constant(last, tf.int64), tf.constant(order, tf.int64)
    last_group = int(np.flatnonzero(group_w > 0)[-1])

    def weighted(s):
        u = tf.random.stateless_uniform([steps], seed=sampling.derive_seed(s, 0),
                                        dtype=tf.float64) * total
        g = tf.minimum(tf.searchsorted(group_cdf, u, side="right", out_type=tf.int64),
                       last_group)
        v = tf.random.stateless_uniform([steps, batch_size], seed=sampling.derive_seed(s, 2),
                                        dtype=tf.float64)
        v = tf.gather(starts_t, g)[:, None] + v * tf.gather(group_w_t, g)[:, None]
        pos = tf.searchsorted(cdf_t, tf.reshape(v, [-1]), side="right", out_type=tf.int64)
        pos = tf.minimum(pos, tf.repeat(tf.gather(last_t, g), batch_size))
        return tf.gather(order_t, pos)
    return weighted


def _transfer_set_weights(index, labelled: np.ndarray) -> np.ndarray:
    """Balanced-sampling weights (float64 [R]) when only the ``labelled`` rows' labels may be
    used: Procedure 1 on those rows' class counts; every other row the labelled rows' mean."""
    if not labelled.any():
        raise DataError("balanced sampling: no training example keeps its labels "
                        "(--labelled_fraction too small for this set)")
    rows = np.repeat(np.arange(index.num_records), np.diff(index.label_indptr))
    counts = np.bincount(index.label_indices[labelled[rows]], minlength=index.num_classes)
    w = index.sampling_weights(counts)
    w[~labelled] = w[labelled].mean()
    return w


def records_fit_in_memory(index, budget_mb: float) -> bool:
    """Whether the i.i.d. order holds ``index``'s records in memory: they total at most
    ``budget_mb`` MB and at most a quarter of the memory available now."""
    if budget_mb <= 0 or index.length is None:
        return False
    total = int(index.length.sum())
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        available = total * 4
    return total <= budget_mb * 1e6 and 4 * total <= available


def _record_reader(index, num_classes: int, transform: Transform | None,
                   in_memory: bool = False) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """row (int64 scalar) → the parsed example: its record read at its byte offset, or, with
    ``in_memory``, looked up in a table of all records read once here (a tenth of the CPU
    time per record for 10-s clips; docs/performance.md, "Records held in memory")."""
    from psla_tf.data import record_index
    file_index = tf.constant(index.file_index, tf.int64)
    position = tf.constant(index.position, tf.int64)
    if in_memory:
        with tf.init_scope(), tf.device("/CPU:0"):
            table = tf.lookup.experimental.MutableHashTable(tf.int64, tf.string, b"")
            for first, recs in record_index.read_all_records(index):   # one shard at a time
                table.insert(tf.range(first, first + tf.size(recs, tf.int64)), recs)

        def read(row):
            return table.lookup(row)
    else:
        offset = tf.constant(index.offset, tf.int64)
        length = tf.constant(index.length, tf.int64)
        files = tf.constant(list(index.files))

        def read(row):
            return record_index.read_record_op(tf.gather(files, tf.gather(file_index, row)),
                                               tf.gather(offset, row), tf.gather(length, row))

    def load(row):
        key = tf.gather(file_index, row) * (1 << _KEY_SHIFT) + tf.gather(position, row)
        return _parse(key, read(row), num_classes, transform)
    return load


def _iid_examples(spec: DataSpec, plan: _EpochPlan, base_seed: tf.Tensor, balanced: bool,
                  mixup: float, mixup_alpha: float, skip_corrupt: bool,
                  num_parallel_calls: int, transform: Transform | None = None,
                  records_in_memory_mb: float = 0.0, group_batches: bool = False
                  ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """epoch → dataset of parsed, mixed examples in i.i.d. order (see make_train_dataset)."""
    index = _random_access_index(spec, skip_corrupt)
    n_rec, draws = index.num_records, plan.draws
    labelled = getattr(transform, "labelled_keys", None)
    labelled = None if labelled is None else np.isin(index.keys(), labelled)
    draw_rows = _row_sampler(index, spec.class_counts, balanced, draws, labelled,
                             plan.batch_size if group_batches else None)
    load = _record_reader(index, spec.num_classes, transform,
                          records_fit_in_memory(index, records_in_memory_mb))

    def examples(epoch):
        s = sampling.derive_seed(base_seed, _SALT_IID, epoch)
        rows = draw_rows(s)
        # Alg. 1 line 10: the partner j ~ U{1..N}, drawn for every position (used if mixed)
        partners = tf.random.stateless_uniform([draws], seed=sampling.derive_seed(s, 1),
                                               minval=0, maxval=n_rec, dtype=tf.int64)
        pos = plan.positions()
        ds = tf.data.Dataset.from_tensor_slices((pos, tf.gather(rows, pos),
                                                 tf.gather(partners, pos)))
        mix_seed = sampling.derive_seed(base_seed, _SALT_MIX, epoch)

        def one(g, row, partner_row):
            ex = load(row)
            if mixup > 0:
                return mixup_example(ex, lambda: load(partner_row),
                                     sampling.derive_seed(mix_seed, g), mixup, mixup_alpha)
            return _unmixed(ex)
        return ds.map(_nag(one), num_parallel_calls=num_parallel_calls, deterministic=True)
    return examples


def _unmixed(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return dict(ex, mix_lambda=tf.constant(1.0), partner_key=tf.constant(-1, tf.int64),
                partner_id=tf.constant(b""))


def _stream_share(spec: DataSpec, plan: "_EpochPlan") -> tuple[np.ndarray, tuple | None]:
    """This pipeline's files (whole shards when there are at least as many as pipelines, else
    every shard with ``record_shard`` = (pipelines, id): every n-th record)."""
    pid, npipe = plan.pid, plan.npipe
    all_ids = np.arange(len(spec.files), dtype=np.int64)
    counts = shard_counts(spec)
    if npipe > 1 and len(spec.files) >= npipe:
        file_ids, record_shard = all_ids[pid::npipe], None
        share = int(counts[file_ids].sum())
    else:
        file_ids, record_shard = all_ids, ((npipe, pid) if npipe > 1 else None)
        share = int(sum((c - pid + npipe - 1) // npipe for c in counts))
    if share == 0:
        raise DataError(f"input pipeline {pid} of {npipe} gets no training example")
    return file_ids, record_shard


def _poisson_rate_scale(spec: DataSpec) -> float:
    """N / W of Algorithm 1's balanced sampling, W from the manifests' class counts (scaled by
    the selected share when a glob picks part of a set)."""
    n_total = int(spec.num_examples)
    w_total = sampling.total_weight(spec.class_counts)
    if w_total == 0:
        raise DataError("balanced sampling: no class has a positive count in the "
                        "manifests (class_counts are all zero)")
    manifest_n = sum(m.num_examples for m in spec.manifests)
    if manifest_n != n_total:  # the glob picked part of a set: W scales with the share
        logging.warning("balanced sampling: %d of %d examples of the manifests selected; "
                        "W approximated as (#classes) * %d / %d", n_total, manifest_n,
                        n_total, manifest_n)
        w_total *= n_total / manifest_n
    return n_total / w_total


def _stream_examples(spec: DataSpec, plan: _EpochPlan, base_seed: tf.Tensor, balanced: bool,
                     mixup: float, mixup_alpha: float, shuffle_buffer: int, skip_corrupt: bool,
                     cycle_length: int, num_parallel_calls: int,
                     transform: Transform | None = None
                     ) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """epoch → dataset of parsed, mixed examples from sequential reading (``"stream"``)."""
    num_classes = spec.num_classes
    pid = plan.pid
    if getattr(transform, "labelled_keys", None) is not None:
        from psla_tf.data.teacher import TRANSFER_SET_NEEDS_IID
        raise DataError(TRANSFER_SET_NEEDS_IID)
    file_ids, record_shard = _stream_share(spec, plan)
    reader = _Reader(spec, skip_corrupt=skip_corrupt, record_shard=record_shard)
    # balanced sampling constants (W from the manifests, no pass over the data)
    inv_counts = tf.constant(sampling.inverse_class_counts(spec.class_counts))
    rate_scale = _poisson_rate_scale(spec) if balanced else 0.0

    def sampled_draw(epoch, draw):
        s = sampling.derive_seed(base_seed, _SALT_MAIN, epoch, pid, draw)
        ds = _traversal(reader, file_ids, sampling.derive_seed(s, 0), cycle_length)
        if balanced:
            k_seed = sampling.derive_seed(s, 1)

            def with_count(key, rec):
                labels = _labels_only(rec, num_classes)
                k = sampling.poisson_counts(labels, sampling.derive_seed(k_seed, key),
                                            inv_counts, rate_scale)
                return key, rec, k
            ds = ds.map(_nag(with_count), num_parallel_calls=num_parallel_calls,
                        deterministic=True)
            ds = ds.filter(_nag(lambda key, rec, k: k > 0))
            ds = ds.flat_map(_nag(lambda key, rec, k:
                                  tf.data.Dataset.from_tensors((key, rec)).repeat(k)))
        ds = ds.shuffle(shuffle_buffer, seed=sampling.seed_to_int(sampling.derive_seed(s, 2)),
                        reshuffle_each_iteration=False)
        return ds

    def partner_pass(epoch, rep):
        s = sampling.derive_seed(base_seed, _SALT_PARTNER, epoch, pid, rep)
        ds = _traversal(reader, file_ids, sampling.derive_seed(s, 0), cycle_length)
        return ds.shuffle(shuffle_buffer, seed=sampling.seed_to_int(sampling.derive_seed(s, 2)),
                          reshuffle_each_iteration=False)

    parse = _nag(lambda key, rec: _parse(key, rec, num_classes, transform))

    def examples(epoch):
        main = tf.data.Dataset.range(MAX_DRAWS_PER_EPOCH).flat_map(
            _nag(lambda d: sampled_draw(epoch, d)))
        main = main.map(parse, num_parallel_calls=num_parallel_calls, deterministic=True)
        if mixup <= 0:
            return main.map(_nag(_unmixed))
        partners = tf.data.Dataset.range(MAX_DRAWS_PER_EPOCH).flat_map(
            _nag(lambda r: partner_pass(epoch, r)))
        mix_seed = sampling.derive_seed(base_seed, _SALT_MIX, epoch, pid)

        def mix(index, pair):
            ex, (partner_key, partner_rec) = pair
            # the partner record is parsed only when the example is mixed
            return mixup_example(ex, lambda: parse(partner_key, partner_rec),
                                 sampling.derive_seed(mix_seed, index), mixup, mixup_alpha)
        return tf.data.Dataset.zip(main, partners).enumerate().map(
            _nag(mix), num_parallel_calls=num_parallel_calls, deterministic=True)
    return examples


def _finish(ds: tf.data.Dataset, prefetch: int) -> tf.data.Dataset:
    opts = tf.data.Options()
    opts.deterministic = True
    ds = ds.with_options(opts)
    return ds.prefetch(prefetch) if prefetch else ds


# ----------------------------------------------------------------------------- evaluation
@_seed_independent
def make_eval_dataset(data: str | DataSpec, batch_size: int = 100,
                      clip_samples: int | None = None, with_ids: bool = False,
                      features_in_pipeline: bool = False, frontend: Callable | None = None,
                      skip_corrupt_records: bool = False, prefetch: int = AUTOTUNE,
                      transform: Transform | None = None) -> tf.data.Dataset:
    """Every example once, shards and records in file order, last partial batch kept.

    Elements as in :func:`make_train_dataset`; ``with_ids`` adds ``id`` and ``key``;
    ``transform`` as there (evaluation uses it to map labels into the model's vocabulary).
    """
    spec = resolve_data(data)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if features_in_pipeline and frontend is None:
        raise ValueError("features_in_pipeline=True needs a frontend")
    clip_samples = DEFAULT_CLIP_SAMPLES if clip_samples is None else int(clip_samples)
    reader = _Reader(spec, skip_corrupt=skip_corrupt_records)
    num_classes = spec.num_classes
    ds = tf.data.Dataset.range(len(spec.files)).flat_map(_nag(reader))
    element = _clip_element(clip_samples, with_ids, ("id", "key"),
                            frontend if features_in_pipeline else None)
    ds = ds.map(_nag(lambda key, rec: element(_parse(key, rec, num_classes, transform))),
                num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=False)
    if not skip_corrupt_records:  # known length: Keras' predict needs no end-of-data probe
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            -(-int(spec.num_examples) // batch_size)))
    return _finish(ds, prefetch)


def data_error_from(exc: Exception) -> DataError | None:
    """The DataError for a tf.errors exception raised by a shard check, else None."""
    msg = getattr(exc, "message", str(exc))
    for marker in ("corrupt or truncated TFRecord shard", "input pipeline ran out"):
        if marker in msg:
            start = msg.index(marker)
            return DataError(msg[start:].split("\n")[0].strip())
    return None
