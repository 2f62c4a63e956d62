"""absl flag definitions of the training job (main.py); reusable by tools.

Defaults are the paper's full-AudioSet recipe (Sec. II-B); ``configs/*.flags`` hold the
three recipes. Call :func:`define_flags` once, then :func:`config_from_flags`.
"""
from __future__ import annotations

from absl import flags

from psla_tf import params
from psla_tf.config import TrainConfig

_BOOL_FIELDS = ("wa", "balanced_sampling", "group_batches", "dry_run", "save_predictions",
                "demo", "resume", "jit_compile", "sync_batchnorm", "deterministic",
                "skip_corrupt_records", "allow_cut_clips", "append_classes")


def _valid_high_freq(value: float) -> bool:
    """``--high_freq`` passes the features' own rule (:func:`psla_tf.params.mel_high_edge`)."""
    try:
        params.mel_high_edge(value)
    except ValueError:
        return False
    return True


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    d = TrainConfig()
    S, I, F, B, E = (flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float,
                     flags.DEFINE_bool, flags.DEFINE_enum)
    S("train_data", None, "Glob of training TFRecord shards (manifest beside them).",
      flag_values=fv)
    S("eval_data", None, "Glob of evaluation shards: metrics every epoch; results reported "
      "on it.", flag_values=fv)
    S("val_data", None, "Optional validation shards (FSD50K): the 'single' result is the "
      "epoch with the best validation mAP, evaluated on --eval_data.", flag_values=fv)
    S("exp_dir", None, "Experiment folder (checkpoints, logs, predictions, summary.json).",
      flag_values=fv)
    I("n_epochs", d.n_epochs, "Epochs (paper: 30 full AudioSet, 60 balanced, 40 FSD50K).",
      flag_values=fv)
    I("batch_size", d.batch_size, "Batch size (paper: 100; FSD50K 24).", flag_values=fv)
    I("eval_batch_size", d.eval_batch_size, "Batch size for evaluation.", flag_values=fv)
    F("lr", d.lr, "Initial learning rate (paper: 1e-4 full, 1e-3 balanced, 5e-4 FSD50K).",
      flag_values=fv)
    I("warmup_steps", d.warmup_steps, "Linear warm-up over this many steps (paper: 1000; "
      "0 disables).", flag_values=fv)
    I("warmup_every", d.warmup_every, "The warm-up raises the lr every this many steps "
      "(reference: 50).", flag_values=fv)
    I("lrscheduler_start", d.lrscheduler_start, "Halve the lr after this epoch (paper: 10 "
      "full, 35 balanced, 10 FSD50K) ...", flag_values=fv)
    I("lrscheduler_step", d.lrscheduler_step, "... and again every this many epochs (5).",
      flag_values=fv)
    F("lrscheduler_decay", d.lrscheduler_decay, "Factor at each milestone (0.5).",
      flag_values=fv)
    F("weight_decay", d.weight_decay, "Adam's coupled L2 weight decay, added to every "
      "gradient (the paper's and the reference's 5e-7).", lower_bound=0, flag_values=fv)
    B("wa", d.wa, "Weight averaging of epochs --wa_start..--wa_end (Sec. VI-A).",
      flag_values=fv)
    I("wa_start", d.wa_start, "First epoch averaged (paper: 16 full, 41 balanced, 21 FSD50K).",
      flag_values=fv)
    I("wa_end", d.wa_end, "Last epoch averaged (paper: the last epoch).", flag_values=fv)
    I("wa_bn_batches", d.wa_bn_batches, "Training batches (at most one epoch) that "
      "re-estimate the averaged model's BatchNorm statistics (SWA's update; not in the "
      "reference). 0: the average of the epochs' moving statistics, as the reference.",
      lower_bound=0, flag_values=fv)
    F("label_smoothing", d.label_smoothing, "Label smoothing ε (not in PSLA): ce trains "
      "against (1 - ε)·one-hot + ε/C, bce against (1 - ε)·y + ε/2. 0: off. Not with a "
      "teacher or --labelled_fraction. Lower on FSDD's validation speakers "
      "(docs/fsdd_recipe.md).", lower_bound=0, upper_bound=0.5, flag_values=fv)
    B("adapt_batchnorm", d.adapt_batchnorm, "Also report the 'adapted' row: the exported "
      "model (weight average, else the last epoch) with its BatchNorm statistics re-estimated "
      "on the evaluated set's own clips, no labels (AdaBN, for unseen speakers / devices; "
      "not in PSLA; tools/adapt.py does the same for new recordings). Written to "
      "adapted_model.keras.", flag_values=fv)
    I("adapt_epochs", d.adapt_epochs, "With --adapt_batchnorm and a single-label model "
      "(--loss=ce): then also adapt the BatchNorm scale and offset to those clips by this "
      "many epochs of information maximisation (confident, diverse predictions; SHOT's IM "
      "loss, not in PSLA). 0: statistics only.", lower_bound=0, flag_values=fv)
    F("adapt_pseudo_label_weight", d.adapt_pseudo_label_weight, "With --adapt_epochs: the "
      "weight β of SHOT's pseudo-label term (each clip labelled by the nearest class centroid "
      "of the clips' embeddings, every epoch; cross-entropy with it joins the IM loss). 0: IM "
      "alone. 0.3 (SHOT's value) was chosen on FSDD's validation speakers.", lower_bound=0,
      flag_values=fv)
    E("adapt_pseudo_labels", d.adapt_pseudo_labels, list(params.PSEUDO_LABELS), "With "
      "--adapt_epochs: how the pseudo-labels are assigned. centroid: each clip its nearest "
      "class centroid (SHOT); balanced: the same similarities assigned so that the clips "
      "spread evenly over the classes (Sinkhorn-Knopp; assumes they cover the classes "
      "evenly; lower on FSDD's validation speakers, docs/fsdd_recipe.md).", flag_values=fv)
    I("self_train_epochs", d.self_train_epochs, "With --adapt_batchnorm, --wa and a "
      "single-label model: then label each evaluated clip with the adapted model's top class "
      "and fine-tune the weight-averaged model this many epochs on the training set plus "
      "those clips, average them and adapt again; that run (exp_dir/self_training_eval) "
      "gives the 'adapted' row (self-training; not in PSLA). 0: off.", lower_bound=0,
      flag_values=fv)
    F("self_train_lr", d.self_train_lr, "With --self_train_epochs: the fine-tuning's "
      "constant learning rate.", lower_bound=0, flag_values=fv)
    I("self_train_neighbours", d.self_train_neighbours, "With --self_train_epochs: propagate "
      "the adapted model's scores over each evaluated clip's this many nearest clips by DTW of "
      "their cepstra before taking the top class (label propagation, Zhou et al. 2004; "
      "psla_tf.label_propagation; for sets of words or short events from one speaker / "
      "device). 0: the adapted model's own top class.", lower_bound=0, flag_values=fv)
    F("self_train_alpha", d.self_train_alpha, "With --self_train_neighbours: the share the "
      "neighbours carry, in [0, 1) (0: none).", lower_bound=0, upper_bound=0.999,
      flag_values=fv)
    B("balanced_sampling", d.balanced_sampling, "Class-balanced sampling (Alg. 1; paper: on "
      "for full AudioSet and FSD50K, off for balanced AudioSet).", flag_values=fv)
    E("sampling_order", d.sampling_order, ["iid", "stream"], "Training order. iid (the "
      "paper's and the reference's): every epoch draws its examples i.i.d. (P(i) = w_i/W with "
      "balanced sampling, else a random permutation) and every mixup partner uniformly from "
      "the whole set, reading records at random offsets (uncompressed shards; an index "
      "{prefix}.index.npz is written by make_tfrecords or built once). stream: sequential "
      "reading with a --shuffle_buffer shuffle, balanced copies emitted back to back and one "
      "partner pass per epoch (bursty order; also for GZIP shards).", flag_values=fv)
    B("group_batches", d.group_batches, "Every training batch from one prepared set (one "
      "shard prefix: one speaker's set in tools/cross_validate.py), so BatchNorm's training "
      "statistics are one group's, as --adapt_batchnorm's are on a new group (not in PSLA; "
      "--sampling_order=iid; each clip's probability unchanged).", flag_values=fv)
    I("records_in_memory_mb", d.records_in_memory_mb, "The iid order reads a training set "
      "of at most this many MB (and a quarter of the free memory) once and keeps it in "
      "memory: each draw is a lookup, not a read at the record's offset (the same batches, "
      "less CPU per clip). 0: always read from the shards.", lower_bound=0, flag_values=fv)
    F("mixup", d.mixup, "Mixup rate (paper: 0.5).", flag_values=fv)
    F("mixup_alpha", d.mixup_alpha, "Mixup λ ~ Beta(α, α) (paper: 10).", flag_values=fv)
    F("random_gain_db", d.random_gain_db, "Random gain augmentation: each training clip is "
      "scaled by U[-x, x] dB (not in PSLA; 0 off). Helps when test recordings are louder or "
      "quieter than the training set's.", flag_values=fv)
    F("random_speed", d.random_speed, "Speed perturbation: each training clip is played at a "
      "rate U[1-x, 1+x] (tempo and pitch; not in PSLA; 0 off). Helps voices/sources unseen "
      "in training.", flag_values=fv)
    F("noise_prob", d.noise_prob, "Additive noise: each training clip gets white Gaussian "
      "noise with this probability, at a signal-to-noise ratio U[--noise_snr_min_db, "
      "--noise_snr_max_db] (not in PSLA; 0 off). For recordings noisier than the training "
      "set's.", flag_values=fv)
    F("noise_snr_min_db", d.noise_snr_min_db, "Lowest SNR of --noise_prob's noise, dB.",
      flag_values=fv)
    F("noise_snr_max_db", d.noise_snr_max_db, "Highest SNR of --noise_prob's noise, dB.",
      flag_values=fv)
    F("noise_decay_min_db", d.noise_decay_min_db, "Coloured noise: --noise_prob's noise "
      "spectrum falls by U[--noise_decay_min_db, --noise_decay_max_db] dB per octave above "
      "100 Hz, drawn per clip (3 pink, 6 brown; both 0: white).", flag_values=fv)
    F("noise_decay_max_db", d.noise_decay_max_db, "Largest fall of --noise_prob's noise "
      "spectrum, dB per octave (see --noise_decay_min_db).", flag_values=fv)
    I("freqm", d.freqm, "Max frequency-mask width in bins (paper: 48; 0 off).", flag_values=fv)
    I("timem", d.timem, "Max time-mask width in frames (paper: 192; 0 off).", flag_values=fv)
    I("time_shift", d.time_shift, "Random delay of each training clip's fbank by 0..x frames "
      "(not in PSLA; 0 off). For short inputs whose sound starts at different times in "
      "different recordings.", flag_values=fv)
    F("vtlp", d.vtlp, "Vocal-tract length perturbation: each training clip's mel axis is "
      "warped by a factor U[1-x, 1+x] (formants move, pitch and tempo stay; Kaldi's VTLN "
      "warp; not in PSLA; 0 off). For voices unseen in training.", flag_values=fv)
    F("trim_onset_db", d.trim_onset_db, "Drop each clip's leading frames more than x dB "
      "below its loudest frame, in training and in every export (not in PSLA; 0 off): every "
      "clip starts at its sound. For short single-event clips (spoken words) whose lead-in "
      "silence differs between recordings.", flag_values=fv)
    I("target_length", d.target_length, "Frames per clip (1056 AudioSet, 3000 FSD50K).",
      flag_values=fv)
    I("clip_samples", None, "Waveform samples per training clip (default: enough for "
      "--target_length, but no more than the longest stored clip).", flag_values=fv)
    B("allow_cut_clips", d.allow_cut_clips, "Accept train/eval/val shards whose clips were cut "
      "at preparation (make_tfrecords --max_seconds) to less than 90 % of the model input "
      "(--target_length); without it such data is refused (FSD50K cut at 10 s for a 30-s "
      "model).", flag_values=fv)
    F("dataset_mean", None, "Fbank normalisation mean (default: the train manifest's "
      f"fbank_mean, else AudioSet's {params.DATASET_MEAN}).", flag_values=fv)
    F("dataset_std", None, "Fbank normalisation std (default: the train manifest's "
      f"fbank_std, else AudioSet's {params.DATASET_STD}).", flag_values=fv)
    E("model", d.model, ["efficientnet", "mobilenet_v2", "resnet50", "cnn"], "Backbone "
      "(Sec. III; cnn: PANNs' CNN10 layout, no ImageNet weights).", flag_values=fv)
    I("eff_b", d.eff_b, "EfficientNet size B0..B7 (paper: B2).", flag_values=fv)
    F("cnn_width", d.cnn_width, "Channel multiplier of --model=cnn (1 = CNN10's "
      "64-128-256-512).", flag_values=fv)
    I("att_head", d.att_head, "Attention heads: 0 mean pooling, 1 single, >1 multi (paper: 4).",
      flag_values=fv)
    S("pretrained", d.pretrained, "none | imagenet (the paper; keras.applications downloads "
      "the weights once to ~/.keras/models) | PATH to an RGB backbone's weights.",
      flag_values=fv)
    E("stem_init", d.stem_init, ["random", "rgb_sum"], "First conv (1 channel) with "
      "pretrained weights: random (the paper) or the sum of the pretrained RGB kernels.",
      flag_values=fv)
    E("backbone_init", d.backbone_init, ["auto", "pytorch", "keras"], "Random "
      "initialisation of the backbone weights not taken from --pretrained: pytorch (torch.nn's "
      "defaults, U(±1/sqrt(fan_in)), as the reference's efficientnet_pytorch), keras "
      "(keras.applications' VarianceScaling(2, fan_out)), auto (pytorch for efficientnet, "
      "keras for the other backbones).", flag_values=fv)
    B("zero_init_residual", d.zero_init_residual, "Start every residual block of the backbone "
      "as the identity (gamma = 0 in the BatchNorm closing its branch; Goyal et al. 2017; not "
      "in the reference): from scratch, EfficientNet leaves the class-prior plateau epochs "
      "sooner (docs/learning.md). --pretrained weights replace it.", flag_values=fv)
    E("head_bias_init", d.head_bias_init, ["reference", "prior"], "Class biases of a new "
      "pooling head (from scratch, or a new vocabulary): reference (the reference's heads: "
      "zero or U(+-1/sqrt(D)) biases, the untrained scores near 0.5) or prior (logit of each class's mean training target under "
      "the run's sampling, so the untrained scores start at the prior; not in the reference; "
      "from scratch it helped some seeds and hurt others, docs/learning.md).", flag_values=fv)
    F("bn_momentum", d.bn_momentum, "BatchNorm moving-average momentum, Keras convention "
      "(new = m * old + (1 - m) * batch). 0.99 = the reference (efficientnet_pytorch's "
      "PyTorch momentum 0.01); short runs on small data do better with 0.9.", flag_values=fv)
    B("fused_batchnorm", d.fused_batchnorm, "Train the backbone's BatchNorm with one fused "
      "kernel (same arithmetic as Keras' separate ops; training steps 1.2-1.4x faster on CPU, "
      "docs/performance.md).", flag_values=fv)
    B("pointwise_matmul", d.pointwise_matmul, "Train the backbone's 1x1 convolutions as one "
      "matrix product each (same arithmetic as Conv2D; training steps 1.07-1.14x faster on "
      "CPU, docs/performance.md). Inference and exports use Conv2D either way.",
      flag_values=fv)
    B("swish_saved_sigmoid", d.swish_saved_sigmoid, "Swish's gradient reuses the forward "
      "pass's sigmoid instead of recomputing it (the same derivative; training steps ~1.06x "
      "faster on CPU, docs/performance.md). Inference and exports use tf.nn.silu either way.",
      flag_values=fv)
    E("loss", d.loss, ["bce", "ce"], "bce (multi-label, paper) or ce (single-label: softmax "
      "cross-entropy of the scores against the label's class, as the reference's CE).",
      flag_values=fv)
    E("metric", d.metric, ["map", "accuracy"], "Headline metric of the summary and of "
      "best-on-validation selection: map (multi-label) or accuracy (single-label); mAP "
      "is always reported too.", flag_values=fv)
    S("init_from", d.init_from, "Fine-tune: a psla_tf .keras model, experiment folder or "
      "epoch_NNN.weights.h5 checkpoint (e.g. an AudioSet model); every matching layer is "
      "loaded, the heads are re-initialised when the vocabulary differs.", flag_values=fv)
    I("freeze_backbone_epochs", d.freeze_backbone_epochs, "Fine-tune: train only the head "
      "for this many first epochs (0: never freeze).", flag_values=fv)
    S("teacher_scores", d.teacher_scores, "Knowledge distillation: a teacher's score files "
      "FILE[,FILE...] (tools/predict.py / tools/ensemble.py .npz, keyed by clip id; several "
      "are averaged per clip; 'logits' arrays instead of 'scores' are taken as logits), or "
      "'stored' for the teacher feature written into the training shards by "
      "tools/add_teacher_scores.py (the way for large sets). Loss = (1 - λ) BCE(labels) + "
      "λ BCE(teacher targets); clips without a teacher score train on labels only (counted "
      "in the log and summary.json). Targets: scores clipped to [0, 1] (PSLA's multi-head "
      "scores can exceed 1), logits through σ(z / T).", flag_values=fv)
    F("kd_lambda", d.kd_lambda, "Weight λ of the teacher term (0: labels only, the teacher "
      "is not read). Default 0.5, EfficientAT-like; on the fully labelled demo validation "
      "prefers 0, with a quarter of the labels (--labelled_fraction) 0.5 lifts the student "
      "(docs/distillation.md, \"Measured results\").",
      flag_values=fv)
    F("kd_temperature", d.kd_temperature, "Temperature T of the teacher targets: σ(z / T) "
      "for logit teachers, σ(logit(p) / T) for score teachers (1: the scores themselves).",
      flag_values=fv)
    F("labelled_fraction", d.labelled_fraction, "Keep the labels of this fraction of the "
      "training clips (a fixed subset by a hash of the clip id, the same in every run); the "
      "others are an unlabelled transfer set: they learn from --teacher_scores only (weight "
      "λ) and add no loss without a teacher. Needs --sampling_order=iid. 1: every clip "
      "keeps its labels.", flag_values=fv)
    B("append_classes", d.append_classes, "Grow a vocabulary: fine-tune the --init_from model "
      "on data with new classes, keeping its outputs: the model has its classes followed by "
      "the new ones (exports carry both), the source model's scores on the training clips "
      "are the teacher targets of its classes (or --teacher_scores), and while "
      "--freeze_backbone_epochs last its classes' scores stay exactly the source's.",
      flag_values=fv)
    S("retain_eval_data", d.retain_eval_data, "With --append_classes: the source model's own "
      "eval shards; each epoch and at the end the original classes' mAP on them is "
      "reported next to the source model's (summary.json 'append_classes').", flag_values=fv)
    I("shuffle_buffer", d.shuffle_buffer, "Shuffle buffer (records) of "
      "--sampling_order=stream (the iid order needs none).", flag_values=fv)
    I("seed", d.seed, "Seed of the data order, augmentation and initialisation.",
      flag_values=fv)
    E("strategy", d.strategy, ["auto", "mirrored", "multi_worker", "tpu"], "tf.distribute "
      "strategy: auto (TPU with --tpu, multi-worker when TF_CONFIG lists several tasks, "
      "mirrored with several GPUs, else one device), mirrored (all local GPUs), "
      "multi_worker (cluster from TF_CONFIG; the chief writes exp_dir), tpu. --batch_size "
      "is the global batch.", flag_values=fv)
    S("tpu", d.tpu, "TPU name or grpc:// address for --strategy=tpu/auto ('local' on a TPU "
      "VM).", flag_values=fv)
    E("mixed_precision", d.mixed_precision, ["none", "mixed_float16", "mixed_bfloat16"],
      "Mixed precision (float16 with dynamic loss scaling; bfloat16 for TPUs / recent "
      "CPUs); the front end, attention pooling, outputs and loss stay float32.",
      flag_values=fv)
    B("jit_compile", d.jit_compile, "Compile the train step with XLA (not with "
      "--deterministic: Keras turns XLA off under op determinism).", flag_values=fv)
    E("fbank_dft", d.fbank_dft, ["auto", "rfft", "matmul"], "DFT of the model's Kaldi fbank "
      "front end (the same features either way): auto = the real-FFT path on CPU and GPU "
      "(fastest), the folded [400, 514] matmul on TPU; exports always use the matmul form.",
      flag_values=fv)
    E("clip_norm", d.clip_norm, ["none", "cmn", "cmvn", "pcen"], "Per-clip normalisation in "
      "the model's front end (not in PSLA; exported models carry it): none = the dataset "
      "mean/std (the paper); cmn = each clip's per-mel-bin mean over its frames removed "
      "(level and fixed channel), then / dataset std; cmvn = per-bin mean and variance of the "
      "clip; pcen = per-channel energy normalisation (a smoothed per-bin gain and a "
      "background offset), then cmvn (docs/decisions.md, 'Per-clip normalisation').",
      flag_values=fv)
    I("num_ceps", d.num_ceps, "Cepstral smoothing in the model's front end (not in PSLA; "
      "exported models carry it): each log-mel frame keeps its first N DCT coefficients (its "
      "spectral envelope, without pitch harmonics); 0 = off (the paper).", lower_bound=0,
      upper_bound=params.NUM_MEL_BINS,
      flag_values=fv)
    F("high_freq", d.high_freq, "Upper edge of the front end's mel banks in Hz (Kaldi's "
      "--high-freq; exported models carry it): 0 = Nyquist, 8 kHz (the paper); <= 0 = Nyquist "
      "minus its magnitude. Below Nyquist for band-limited audio (8-kHz recordings: 4000), so "
      "no mel bin holds only the empty band.", flag_values=fv)
    I("num_mel_bins", d.num_mel_bins, "Mel bins of the front end's fbank (exported models "
      "carry it): 128 (the paper). Fewer bins make the CNN's input and its cost smaller "
      "(64: about 1.5x faster training steps); a model fine-tuned from another with a "
      "different count keeps every convolution (--init_from).", lower_bound=3,
      upper_bound=params.FFT_LENGTH // 2, flag_values=fv)
    flags.register_validator("high_freq", _valid_high_freq, "--high_freq must be in "
                             f"({params.LOW_FREQ:g}, {params.SAMPLE_RATE / 2:g}] Hz, or <= 0 "
                             f"for Nyquist minus its magnitude (above {params.LOW_FREQ:g} Hz)",
                             flag_values=fv)
    B("sync_batchnorm", d.sync_batchnorm, "With several replicas, BatchNorm uses the "
      "statistics of the global batch (the result does not depend on the device count; "
      "the reference's DataParallel uses per-GPU statistics).", flag_values=fv)
    B("deterministic", d.deterministic, "tf.config.experimental.enable_op_determinism: "
      "bitwise-repeatable runs (a resumed run equals an uninterrupted one); slower on GPU.",
      flag_values=fv)
    B("skip_corrupt_records", d.skip_corrupt_records, "A corrupt or truncated shard: skip "
      "its unreadable rest (counted, logged, in summary.json) instead of stopping with an "
      "error naming it.", flag_values=fv)
    B("save_predictions", d.save_predictions, "Save every epoch's eval scores (.npy).",
      flag_values=fv)
    B("resume", d.resume, "Continue a killed run from exp_dir's last committed epoch "
      "(weights, optimizer, schedule, accumulators, logs; see docs/scale.md).",
      flag_values=fv)
    B("dry_run", d.dry_run, "Print the resolved configuration, parameter count (no "
      "pretrained weights are fetched), input length, per-epoch lr and WA window, then exit.",
      flag_values=fv)
    B("demo", d.demo, "Generate (cached) the synthetic demo dataset in --demo_dir, prepare "
      "shards, and train on it (configs/demo.flags).", flag_values=fv)
    S("demo_dir", d.demo_dir, "Cache folder of the demo dataset.", flag_values=fv)
    I("verbose", d.verbose, "Keras fit verbosity: 0 silent, 1 progress bar, 2 one line per "
      "epoch. Default: 1 when stdout is a terminal, 2 when it is redirected to a file or pipe "
      "(cluster logs get no progress-bar escape codes).", flag_values=fv)


def config_from_flags(fv: flags.FlagValues = flags.FLAGS) -> TrainConfig:
    import dataclasses
    values = {f.name: fv[f.name].value for f in dataclasses.fields(TrainConfig)
              if f.name in fv}
    return TrainConfig(**values)
