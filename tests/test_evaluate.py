"""The evaluation set's slices (evaluate.SLICES): which generated photos fall in which slice,
read from the original photo and not from its processed copy; the accuracy figures of each
slice and the model card's table of them. numpy and Pillow only: no training here."""
import csv
import os

import numpy as np
from PIL import Image

import catdog
import evaluate
import harness

# name: (synthetic_photo options, the slices the photo is in)
PHOTOS = {
    "cat.1.jpg": ({"size": (300, 240)}, set()),
    "cat.2.jpg": ({"size": (300, 240), "dark": True}, {"dark"}),
    "cat.3.jpg": ({"size": (150, 180)}, {"small"}),
    "cat.4.jpg": ({"size": (300, 240), "gray": True}, {"grey"}),
    "dog.1.jpg": ({"size": (500, 250)}, {"wide"}),
    "dog.2.jpg": ({"size": (240, 400)}, {"tall"}),
    "dog.3.jpg": ({"size": (100, 170), "dark": True}, {"small", "tall", "dark"}),
    "dog.4.jpg": ({"size": (320, 200)}, set()),  # 1.6 exactly is not wide
}


def write_photos(folder, photos):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (options, _) in photos.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(harness.synthetic_photo(rng, kind=name.split(".")[0], **options))


def members(evaluation):
    """{file name: the slices its photo is in}."""
    slices = evaluation.slices
    return {os.path.basename(path): {name for name, inside in slices.items() if inside[i]}
            for i, (path, _) in enumerate(evaluation.items)}


def test_slices_of_generated_photos(tmp_path):
    write_photos(tmp_path / "extra", PHOTOS)
    Image.new("L", (260, 260), 128).save(tmp_path / "extra" / "cat.5.png")  # greyscale by mode
    evaluation = evaluate.evaluation_set([], str(tmp_path / "extra"), str(tmp_path))
    assert members(evaluation) == {**{name: slices for name, (_, slices) in PHOTOS.items()}, "cat.5.png": {"grey"}}
    assert list(evaluation.slices) == list(evaluate.SLICES) == ["dark", "small", "grey", "wide", "tall"]


def test_a_test_photos_slices_come_from_its_original_not_its_processed_copy(tmp_path, capsys):
    """The test split is stored as 224 x 224 copies; the manifest names each one's original,
    which is what the evaluation measures and slices: here a small, dark, tall photo."""
    write_photos(tmp_path / "raw", {"dog.3.jpg": PHOTOS["dog.3.jpg"]})
    copy = tmp_path / "data" / "processed" / "test" / "dog" / "dog.3.jpg"
    copy.parent.mkdir(parents=True)
    catdog.fit_for_storage(catdog.open_image(str(tmp_path / "raw" / "dog.3.jpg"))).save(copy)
    with open(tmp_path / "data" / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "source", "label", "split", "drop_reason"])
        writer.writerow(["processed/test/dog/dog.3.jpg", "../raw/dog.3.jpg", "dog", "test", ""])
    data = str(tmp_path / "data" / "processed")
    copies = [(str(copy), 1)]
    assert members(evaluate.evaluation_set(copies, None, data)) == {"dog.3.jpg": {"dark"}}  # 224 x 224
    originals = evaluate.original_photos(copies, data)
    assert originals == [(str(tmp_path / "raw" / "dog.3.jpg"), 1)]
    assert members(evaluate.evaluation_set(originals, None, data)) == {"dog.3.jpg": {"small", "tall", "dark"}}
    assert "warning" not in capsys.readouterr().out
    (tmp_path / "raw" / "dog.3.jpg").unlink()  # the original is not on this machine: said, not silent
    assert evaluate.original_photos(copies, data) == copies
    assert "warning: 1 of 1 test photos have no original on this machine" in capsys.readouterr().out


def test_measure_gives_each_slice_its_accuracy_interval_and_errors(tmp_path):
    write_photos(tmp_path / "extra", PHOTOS)
    evaluation = evaluate.evaluation_set([], str(tmp_path / "extra"), str(tmp_path))
    labels = evaluation.labels
    wrong = np.array([os.path.basename(path) in ("cat.2.jpg", "cat.3.jpg") for path, _ in evaluation.items])
    predicted = np.where(wrong, 1 - labels, labels)
    probs = np.stack([1 - predicted, predicted], axis=1) * 0.8 + 0.1
    metrics = evaluate.flat(evaluate.measure(probs, evaluation))
    # dark: cat.2 (wrong) and dog.3; small: cat.3 (wrong) and dog.3; grey: cat.4 alone; no photo is both.
    assert metrics["slice_dark_images"] == 2 and metrics["slice_dark_errors"] == 1
    assert metrics["slice_dark_accuracy"] == 0.5
    assert (metrics["slice_dark_accuracy_low"], metrics["slice_dark_accuracy_high"]) == evaluate.wilson_interval(1, 2)
    assert (metrics["slice_small_images"], metrics["slice_small_errors"]) == (2, 1)
    assert (metrics["slice_grey_accuracy"], metrics["slice_grey_errors"]) == (1.0, 0)
    assert (metrics["eval_images"], metrics["eval_errors"], metrics["eval_accuracy"]) == (8, 2, 0.75)
    table = evaluate.slice_table(metrics)
    assert "| all photos | - | 8 | 0.7500 (" in table
    assert f"| dark | mean luminance < {evaluate.SLICE_DARK} of 255 | 2 | 0.5000 (" in table


def test_an_empty_slice_has_photos_and_errors_but_no_accuracy():
    assert evaluate.accuracy_figures(np.zeros(0, dtype=bool)) == {"images": 0, "errors": 0}
    metrics = {**{f"eval_{k}": v for k, v in evaluate.accuracy_figures(np.array([True, False])).items()},
               **{f"slice_{name}_{k}": v for name in evaluate.SLICES
                  for k, v in evaluate.accuracy_figures(np.zeros(0, dtype=bool)).items()}}
    table = evaluate.slice_table(metrics).splitlines()
    assert table[0] == "| slice | rule | photos | accuracy (95 % interval) | errors |"
    assert table[4] == f"| small | shorter side < {evaluate.SLICE_SMALL} px | 0 | - | 0 |"
    assert len(table) == 2 + 1 + len(evaluate.SLICES)

