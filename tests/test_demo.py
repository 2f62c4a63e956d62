"""The demo generator's labels: exact on evaluation clips, deliberately incomplete on training
clips (psla_tf/demo.py's module docstring)."""
import numpy as np

from psla_tf import demo


def test_eval_labels_are_the_complete_labels():
    for i in range(40):
        _, labels, events = demo.make_clip(0, "eval", i, 3.0)
        assert labels == demo.complete_labels(events)
        for e in events:
            parent = next(c.parent for c in demo.EVENT_CLASSES if c.mid == e["label"])
            assert e["label"] in labels and (parent is None or parent in labels)


def test_train_labels_miss_the_drawn_labels_only():
    chirp_clips = chirp_dropped = 0
    for i in range(400):
        _, labels, events = demo.make_clip(0, "train", i, 3.0, missing_label_rate=0.3)
        complete = demo.complete_labels(events)
        assert set(labels) <= set(complete)
        missing = set(complete) - set(labels)
        allowed = {demo.TYPE2_PARENT} | {c.mid for c in demo.EVENT_CLASSES
                                         if c.parent == demo.TYPE1_PARENT}
        assert missing <= allowed
        if demo.TYPE2_PARENT in complete:
            chirp_clips += 1
            chirp_dropped += demo.TYPE2_PARENT not in labels
    # the Type II drop rate is 0.3: a binomial 99.9 % interval around it
    p, n = 0.3, chirp_clips
    assert n > 50
    assert abs(chirp_dropped / n - p) < 3.3 * np.sqrt(p * (1 - p) / n)
    # with no missing labels the training labels are complete
    _, labels, events = demo.make_clip(0, "train", 3, 3.0, missing_label_rate=0.0)
    assert labels == demo.complete_labels(events)
