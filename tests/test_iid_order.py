"""The training order is i.i.d. (paper Alg. 1; DESIGN.md "Sampling"; issue 15, items 2-4).

The stream written by ``tools/sampling_report.py --stream_csv`` (the training code path) on a
skewed label set, with a shuffle buffer far smaller than the set, is compared with what
i.i.d. draws give:

* copies: clip i's count in an epoch of L draws ~ Binomial(L, p_i), p_i = w_i / W (Pearson
  chi-square over clips, p > 1e-3); repeat pairs inside a batch ≈ steps B(B-1)/2 Σ p_i²
  (|z| < 4, Poisson approximation); the gap between a clip's first two copies, given k copies,
  has P(G >= x) = C(L-x+1, k)/C(L, k) (KS test of the randomised PIT, p > 1e-3);
* partners: the partner uses of a clip in an epoch ~ Binomial(M, 1/N) ≈ Poisson(m) (chi-square
  of the pooled histogram, p > 1e-3), uniform over clips (chi-square, p > 1e-3);
* unseen (Fig. 6): mean_i e^(-E N p_i) without mixup, times e^(-m E) with it (the paper's
  formulas for L = N), within 4 binomial standard deviations (+ 0.005 for the e^x vs (1-x)^L
  approximation).

The same statistics on ``sampling_order="stream"`` fail (bursts), so the tests discriminate.
"""
from __future__ import annotations

import csv
import os
import struct

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from helpers_cli import run_script
from helpers_data import random_labels, random_waveforms, write_shards
from psla_tf.data import pipeline, record_index, records, report, sampling
from psla_tf.data.records import DataError

N, C, B, EPOCHS, MIXUP, BUFFER = 1500, 12, 30, 6, 0.5, 16


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    rng = np.random.default_rng(21)
    labels = random_labels(N, C, rng, skew=2.0, max_labels=3)
    d = tmp_path_factory.mktemp("iid")
    glob = write_shards(str(d), random_waveforms(N, rng, 16, 40), labels, C, num_shards=6)
    counts = np.zeros(C)
    for row in labels:
        counts[row] += 1
    w = sampling.balanced_sampling_weights(labels, counts)
    return glob, labels, w / w.sum()


def _read_stream(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "position", "id", "partner"]
    return rows


@pytest.fixture(scope="module")
def stream(skewed, tmp_path_factory):
    """tools/sampling_report.py --stream_csv (default order), as a user runs it (its command,
    in-process)."""
    glob, _, _ = skewed
    out = tmp_path_factory.mktemp("iid_report")
    p = run_script("sampling_report.py", f"--train_data={glob}", f"--epochs={EPOCHS}",
                   f"--mixup={MIXUP}", f"--batch_size={B}", f"--shuffle_buffer={BUFFER}",
                   "--seed=3", f"--out_dir={out}", f"--stream_csv={out / 'stream.csv'}",
                   "--noprogress")
    assert p.returncode == 0, p.stderr[-3000:]
    return _read_stream(out / "stream.csv"), out, p.stdout


def _per_epoch(rows):
    ids = {f"clip{i:05d}": i for i in range(N)}
    out = {}
    for r in rows:
        e = out.setdefault(int(r["epoch"]), {"pos": [], "row": [], "partner": []})
        e["pos"].append(int(r["position"]))
        e["row"].append(ids[r["id"]])
        e["partner"].append(ids[r["partner"]] if r["partner"] else -1)
    return {k: {a: np.asarray(v) for a, v in e.items()} for k, e in sorted(out.items())}


# ----------------------------------------------------------------------------- copies, order
def _order_stats(epochs, p):
    """Pooled statistics of the copies (see the module docstring) over the epochs."""
    rng = np.random.default_rng(0)
    chi2, dof, pits, pairs, pairs_exp = 0.0, 0, [], 0, 0.0
    for e in epochs.values():
        L = len(e["row"])
        assert np.array_equal(e["pos"], np.arange(L))
        counts = np.bincount(e["row"], minlength=N)
        m = p > 0
        chi2 += float((((counts - L * p) ** 2) / (L * p))[m].sum())
        dof += int(m.sum()) - 1
        assert counts[~m].sum() == 0                   # unlabelled clips are never drawn
        for b in range(L // B):
            _, mult = np.unique(e["row"][b * B:(b + 1) * B], return_counts=True)
            pairs += int((mult * (mult - 1) // 2).sum())
        pairs_exp += (L // B) * B * (B - 1) / 2 * float(np.sum(p ** 2))
        first, gaps, ks = {}, [], []
        for q, r in enumerate(e["row"]):
            if r in first:
                if first[r] >= 0:
                    gaps.append(q - first[r])
                    ks.append(counts[r])
                    first[r] = -1
            else:
                first[r] = q
        pits.append(report.gap_pit(np.asarray(gaps, float), np.asarray(ks, float), L, rng))
    return (stats.chi2.sf(chi2, dof), pairs, pairs_exp,
            stats.kstest(np.concatenate(pits), "uniform").pvalue)


def test_copies_are_iid_draws(skewed, stream):
    _, _, p = skewed
    rows, _, _ = stream
    epochs = _per_epoch(rows)
    assert sorted(epochs) == list(range(1, EPOCHS + 1))
    assert all(len(e["row"]) == (N // B) * B for e in epochs.values())
    p_counts, pairs, pairs_exp, p_gaps = _order_stats(epochs, p)
    assert p_counts > 1e-3, p_counts                       # Binomial(L, p_i) per clip
    assert abs(pairs - pairs_exp) < 4 * np.sqrt(pairs_exp), (pairs, pairs_exp)
    assert p_gaps > 1e-3, p_gaps                           # copies spread as i.i.d. positions


def test_partners_are_iid_uniform(stream):
    rows, _, _ = stream
    epochs = _per_epoch(rows)
    hist_obs, hist_exp, all_partners = np.zeros(6), np.zeros(6), []
    for e in epochs.values():
        mixed = e["partner"][e["partner"] >= 0]
        M = len(mixed)
        assert stats.binomtest(M, len(e["row"]), MIXUP).pvalue > 1e-3
        uses = np.bincount(mixed, minlength=N)
        hist_obs += np.bincount(np.minimum(uses, 5), minlength=6)
        pmf = stats.binom.pmf(np.arange(5), M, 1.0 / N)
        hist_exp += N * np.append(pmf, 1 - pmf.sum())
        all_partners.append(mixed)
    # a clip is a partner 0, 1, 2, ... times per epoch with Binomial(M, 1/N) ≈ Poisson(m)
    # frequencies (one shuffled pass per epoch would give only 0 or 1)
    assert hist_obs[2:].sum() > 0.05 * hist_obs.sum()
    assert stats.chisquare(hist_obs, hist_exp).pvalue > 1e-3, (hist_obs, hist_exp)
    # uniform over the whole set, unlabelled clips included
    counts = np.bincount(np.concatenate(all_partners), minlength=N)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_unseen_fraction_matches_the_papers_formulas(skewed, stream):
    _, _, p = skewed
    rows, out, stdout = stream
    epochs = _per_epoch(rows)
    drawn, used = np.zeros(N, bool), np.zeros(N, bool)
    for e_num, e in epochs.items():
        drawn[e["row"]] = True
        used[e["row"]] = True
        used[e["partner"][e["partner"] >= 0]] = True
        q0 = np.exp(-e_num * N * p)                      # P(never drawn), paper's form
        q1 = q0 * np.exp(-MIXUP * e_num)                 # ... nor a partner (e^(-mE))
        for obs, q in ((1 - drawn.mean(), q0), (1 - used.mean(), q1)):
            sd = np.sqrt(np.sum(q * (1 - q))) / N
            assert abs(obs - q.mean()) < 4 * sd + 0.005, (e_num, obs, q.mean(), sd)
    # the tool's own report says the same
    with open(out / "unseen.csv") as f:
        rep = list(csv.DictReader(f))
    assert float(rep[-1]["unseen_fraction"]) == pytest.approx(1 - used.mean(), abs=1e-6)
    assert float(rep[-1]["unseen_without_mixup"]) == pytest.approx(1 - drawn.mean(), abs=1e-6)
    assert "unseen after epoch" in stdout and os.path.getsize(out / "unseen.png") > 5000
    with open(out / "order.csv") as f:
        order = list(csv.DictReader(f))
    assert len(order) == EPOCHS and all(float(r["gap_ks_pvalue"]) > 1e-4 for r in order)


def test_stream_csv_is_the_training_stream(skewed, stream):
    """The CSV rows are the batches make_train_dataset yields for training (same seed)."""
    glob, _, _ = skewed
    rows, _, _ = stream
    ds = pipeline.make_train_dataset(glob, batch_size=B, clip_samples=8, mixup=MIXUP, seed=3,
                                     num_epochs=2, initial_epoch=0, with_ids=True,
                                     shuffle_buffer=BUFFER)
    ids, partners = [], []
    for f, _ in ds.as_numpy_iterator():
        ids += [x.decode() for x in f["id"]]
        partners += [x.decode() for x in f["partner_id"]]
    n = len(ids)
    assert [r["id"] for r in rows[:n]] == ids and [r["partner"] for r in rows[:n]] == partners


def test_stream_order_is_bursty_and_fails_the_same_checks(skewed):
    """The sequential mode with the same small buffer: the checks above reject it."""
    glob, _, p = skewed
    ds = pipeline.make_train_dataset(glob, batch_size=B, clip_samples=8, mixup=MIXUP, seed=3,
                                     num_epochs=2, with_ids=True, shuffle_buffer=BUFFER,
                                     sampling_order="stream")
    rows = [{"epoch": str(1 + i // N), "position": str(i % N), "id": x.decode(),
             "partner": y.decode()}
            for i, (x, y) in enumerate((a, b) for f, _ in ds.as_numpy_iterator()
                                       for a, b in zip(f["id"], f["partner_id"]))]
    _, pairs, pairs_exp, p_gaps = _order_stats(_per_epoch(rows), p)
    assert pairs > 3 * pairs_exp and p_gaps < 1e-6, (pairs, pairs_exp, p_gaps)


# ----------------------------------------------------------------------------- mechanics
def test_reads_are_the_examples_and_the_mixed_partners(skewed, monkeypatch):
    """I/O per epoch = L examples + M mixed partners, each one record read at its offset."""
    glob, _, _ = skewed
    calls = []
    real = record_index.read_record_op

    def counting(path, offset, length):   # every execution of the in-graph read
        tick = tf.numpy_function(lambda o: calls.append(int(o)) or np.int64(0), [offset],
                                 tf.int64)
        with tf.control_dependencies([tick]):
            return real(path, offset, length)
    monkeypatch.setattr(record_index, "read_record_op", counting)
    ds = pipeline.make_train_dataset(glob, batch_size=B, clip_samples=8, mixup=MIXUP, seed=1,
                                     with_ids=True, num_parallel_calls=1, prefetch=0,
                                     records_in_memory_mb=0)
    mixed = sum(int((f["partner_key"] >= 0).sum()) for f, _ in ds.as_numpy_iterator())
    assert len(calls) == (N // B) * B + mixed


def test_records_in_memory_are_the_records_read_at_their_offsets(skewed, tmp_path,
                                                                  monkeypatch):
    """A set held in memory (the default for small sets) gives the batches of reading each
    record at its offset, bit for bit, and reads no record at an offset; every record
    read at once is the record at its offset; a shard changed after indexing fails."""
    glob, _, _ = skewed
    idx = record_index.load_record_index(records.load_data_spec(glob))
    assert pipeline.records_fit_in_memory(idx, pipeline.RECORDS_IN_MEMORY_MB)
    assert not pipeline.records_fit_in_memory(idx, 0)
    assert not pipeline.records_fit_in_memory(idx, idx.length.sum() / 1e6 * 0.99)
    every = np.concatenate([r.numpy() for _, r in record_index.read_all_records(idx)])
    for row in (0, 1, 700, N - 1):
        at = record_index.read_record_op(
            tf.constant(idx.files[idx.file_index[row]]), tf.constant(idx.offset[row]),
            tf.constant(idx.length[row]))
        assert every[row] == at.numpy()
    kw = dict(batch_size=B, clip_samples=8, mixup=MIXUP, seed=3, with_ids=True, num_epochs=2)
    read = list(pipeline.make_train_dataset(glob, records_in_memory_mb=0, **kw)
                .as_numpy_iterator())
    monkeypatch.setattr(record_index, "read_record_op", None)   # any read at an offset fails
    held = list(pipeline.make_train_dataset(glob, **kw).as_numpy_iterator())
    assert len(read) == len(held) == 2 * (N // B)
    for (fa, ya), (fb, yb) in zip(read, held):
        np.testing.assert_array_equal(ya, yb)
        for k in ("waveform", "num_samples", "key", "partner_key", "mix_lambda"):
            np.testing.assert_array_equal(fa[k], fb[k])
    # a shard rewritten in place with other records, its index entry kept: refused
    rng = np.random.default_rng(3)
    g2 = write_shards(str(tmp_path), random_waveforms(6, rng, 10, 20), [[0]] * 6, 2, 1)
    i2 = record_index.load_record_index(records.load_data_spec(g2))
    write_shards(str(tmp_path), random_waveforms(6, rng, 21, 30), [[0]] * 6, 2, 1)
    with pytest.raises(DataError, match="differ from its index"):
        list(record_index.read_all_records(i2))


def test_tf_data_service_runs_the_iid_order(tmp_path):
    """The reads run in the graph (no Python per record): a tf.data service (dispatcher and
    worker in this process) yields the pipeline's own batches, records read at their offsets
    or held in memory."""
    rng = np.random.default_rng(4)
    glob = write_shards(str(tmp_path), random_waveforms(40, rng, 16, 40),
                        random_labels(40, 3, rng), 3, num_shards=2)
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    worker = service.WorkerServer(service.WorkerConfig(   # noqa: F841 (kept alive)
        dispatcher_address=dispatcher.target.split("://")[1]))
    for mb in (0, pipeline.RECORDS_IN_MEMORY_MB):
        ds = pipeline.make_train_dataset(glob, batch_size=4, clip_samples=8, mixup=MIXUP,
                                         seed=2, records_in_memory_mb=mb)
        own = [y for _, y in ds.as_numpy_iterator()]
        served = [y for _, y in ds.apply(service.distribute(
            processing_mode="parallel_epochs", service=dispatcher.target)).as_numpy_iterator()]
        assert len(served) == len(own) == 10
        for a, b in zip(own, served):
            np.testing.assert_array_equal(a, b)


def test_one_global_stream_split_across_input_pipelines(skewed):
    """Two input pipelines (replicas) yield together exactly the one-pipeline stream: every
    global batch = pipeline 0's per-replica batch followed by pipeline 1's, same partners."""
    glob, _, _ = skewed
    kw = dict(batch_size=B, clip_samples=8, mixup=MIXUP, seed=4, with_ids=True, num_epochs=1)
    one = [f for f, _ in pipeline.make_train_dataset(glob, **kw).as_numpy_iterator()]
    parts = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)
        parts.append([f for f, _ in pipeline.make_train_dataset(
            glob, input_context=ctx, **kw).as_numpy_iterator()])
    assert len(parts[0]) == len(parts[1]) == len(one)
    for g, a, b in zip(one, *parts):
        for k in ("key", "partner_key", "mix_lambda"):
            np.testing.assert_array_equal(g[k], np.concatenate([a[k], b[k]]))
        np.testing.assert_array_equal(g["waveform"], np.concatenate([a["waveform"],
                                                                     b["waveform"]]))


def test_resume_and_determinism(skewed):
    glob, _, _ = skewed
    kw = dict(batch_size=B, clip_samples=8, mixup=MIXUP, seed=6, with_ids=True)
    full = list(pipeline.make_train_dataset(glob, num_epochs=2, **kw).as_numpy_iterator())
    again = list(pipeline.make_train_dataset(glob, initial_epoch=1, **kw).as_numpy_iterator())
    steps = N // B
    assert len(full) == 2 * steps and len(again) == steps
    for (fa, ya), (fb, yb) in zip(full[steps:], again):
        np.testing.assert_array_equal(fa["key"], fb["key"])
        np.testing.assert_array_equal(fa["waveform"], fb["waveform"])
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(np.concatenate([f["key"] for f, _ in full[:steps]]),
                              np.concatenate([f["key"] for f, _ in full[steps:]]))


def test_permutation_without_balanced_sampling(skewed):
    glob, _, _ = skewed
    ds = pipeline.make_train_dataset(glob, batch_size=B, clip_samples=8, mixup=0.0, seed=2,
                                     balanced_sampling=False, with_ids=True, num_epochs=2)
    keys = np.concatenate([f["key"] for f, _ in ds.as_numpy_iterator()])
    e0, e1 = keys[:N], keys[N:]
    assert len(set(e0.tolist())) == N and set(e0.tolist()) == set(e1.tolist())
    assert not np.array_equal(e0, e1)


def test_record_index_matches_the_tfrecord_framing(skewed, tmp_path):
    """Offsets/lengths from the index = the framing parsed here with struct; the index
    written at preparation equals the one built by a pass; a rewritten shard is re-indexed."""
    glob, labels, _ = skewed
    spec = records.load_data_spec(glob)
    idx = record_index.load_record_index(spec)
    row = 0
    for fi, path in enumerate(spec.files):
        data = open(path, "rb").read()
        off = 0
        while off < len(data):
            (n,) = struct.unpack("<Q", data[off:off + 8])
            assert idx.file_index[row] == fi and idx.offset[row] == off and idx.length[row] == n
            ex = tf.train.Example.FromString(data[off + 12:off + 12 + n])
            assert list(ex.features.feature["labels"].int64_list.value) == sorted(labels[row])
            got = record_index.read_record_op(tf.constant(path), tf.constant(off, tf.int64),
                                              tf.constant(n, tf.int64))
            assert got.numpy() == data[off + 12:off + 12 + n]
            off += n + 16
            row += 1
    assert row == N == idx.num_records
    lab = [sorted(idx.label_indices[idx.label_indptr[r]:idx.label_indptr[r + 1]].tolist())
           for r in range(N)]
    assert lab == [sorted(set(x)) for x in labels]
    for off, n in ((0, 5), (3, int(idx.length[0]))):   # a stale length / offset
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="corrupt or truncated TFRecord shard"):
            record_index.read_record_op(tf.constant(spec.files[0]), tf.constant(off, tf.int64),
                                        tf.constant(n, tf.int64))
    # a shard rewritten with other records: the stale entry (other size) is not used
    rng = np.random.default_rng(0)
    g2 = write_shards(str(tmp_path), random_waveforms(8, rng, 10, 20), [[0]] * 8, 2, 1)
    s2 = records.load_data_spec(g2)
    assert record_index.load_record_index(s2).num_records == 8
    write_shards(str(tmp_path), random_waveforms(5, rng, 30, 40), [[1]] * 5, 2, 1)
    s2 = records.load_data_spec(g2)
    i2 = record_index.load_record_index(s2)
    assert i2.num_records == 5 and set(i2.label_indices.tolist()) == {1}


def test_gzip_shards_need_the_stream_order(tmp_path):
    rng = np.random.default_rng(1)
    glob = write_shards(str(tmp_path), random_waveforms(20, rng, 10, 20),
                        random_labels(20, 3, rng), 3, num_shards=2, compression="GZIP")
    with pytest.raises(DataError, match="GZIP.*--sampling_order=stream"):
        pipeline.make_train_dataset(glob, batch_size=4, clip_samples=8)
    ds = pipeline.make_train_dataset(glob, batch_size=4, clip_samples=8,
                                     sampling_order="stream")
    assert sum(1 for _ in ds) == 5


def test_report_gap_law_against_simulation():
    """gap_survival = the empirical law of the gap between the first two of k random
    positions out of L (10,000 numpy draws per k, |Δ| < 0.02)."""
    rng = np.random.default_rng(5)
    L = 200
    for k in (2, 3, 7):
        gaps = []
        for _ in range(10000):
            s = np.sort(rng.choice(L, size=k, replace=False))
            gaps.append(s[1] - s[0])
        gaps = np.asarray(gaps)
        for x in (1, 5, 20, 60):
            assert abs(np.mean(gaps >= x) - report.gap_survival(np.array([x]), np.array([k]),
                                                                L)[0]) < 0.02
        assert np.mean(gaps) == pytest.approx((L + 1) / (k + 1), rel=0.03)


@pytest.mark.parametrize("in_memory_mb", [0, pipeline.RECORDS_IN_MEMORY_MB])
def test_reads_do_not_accumulate_memory(tmp_path, in_memory_mb):
    """Random-access reads (or lookups of the records held in memory, 19 MB here) keep
    nothing alive: 10 further epochs over 30 clips of 20 s (~450 reads of 640 kB) grow the
    resident set by < 80 MB (a retained record per read would add ~290 MB, as a numpy object
    array returned from the read did)."""
    rng = np.random.default_rng(0)
    glob = write_shards(str(tmp_path), random_waveforms(30, rng, 320000, 320000),
                        random_labels(30, 3, rng), 3, num_shards=3)

    def rss_mb():
        line = [x for x in open("/proc/self/status") if x.startswith("VmRSS:")][0]
        return int(line.split()[1]) / 1024

    kw = dict(batch_size=10, clip_samples=800, mixup=0.5, seed=0,
              records_in_memory_mb=in_memory_mb)
    for _ in pipeline.make_train_dataset(glob, num_epochs=1, **kw):
        pass
    before = rss_mb()
    for _ in pipeline.make_train_dataset(glob, num_epochs=10, **kw):
        pass
    assert rss_mb() - before < 80, (before, rss_mb())


def test_configure_input_host(skewed):
    """In a fresh process: the intra-op pool at one thread, glibc's mallopt accepted, and
    the pipeline's batches the same as in a process with TensorFlow's defaults."""
    import platform
    import subprocess
    import sys
    glob, _, _ = skewed
    code = ("import sys, numpy as np\n"
            "from psla_tf.data import pipeline\n"
            "ok = pipeline.configure_input_host() if sys.argv[1] == '1' else None\n"
            "import tensorflow as tf\n"
            "ds = pipeline.make_train_dataset(sys.argv[2], batch_size=4, clip_samples=8,\n"
            "    mixup=0.5, seed=1, num_epochs=1)\n"
            "w = np.concatenate([f['waveform'] for f, _ in ds.as_numpy_iterator()])\n"
            "print('RESULT', ok, tf.config.threading.get_intra_op_parallelism_threads(),\n"
            "      repr(w.tobytes().hex()))\n")
    out = {}
    for mode in ("1", "0"):
        p = subprocess.run([sys.executable, "-c", code, mode, glob], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        out[mode] = next(x for x in p.stdout.splitlines() if x.startswith("RESULT")).split()
    glibc = platform.libc_ver()[0] == "glibc"
    assert out["1"][1] == str(glibc) and out["1"][2] == "1"
    assert out["0"][2] == "0" and out["1"][3] == out["0"][3]
