"""WAR, UAR and the confusion matrix on hand-made cases."""
import pytest
import torch

from mpafer.metrics import confusion_matrix, format_report, summarize

NAMES = ["neutral", "happiness", "sadness"]


def test_confusion_rows_are_true_columns_are_predicted():
    # Two true neutrals, one predicted as sadness; one true happiness predicted as neutral.
    targets = torch.tensor([0, 0, 1, 2])
    preds = torch.tensor([0, 2, 0, 2])
    expected = [[1, 0, 1],   # true neutral: 1 right, 1 predicted sadness
                [1, 0, 0],   # true happiness: predicted neutral
                [0, 0, 1]]   # true sadness: right
    assert confusion_matrix(preds, targets, 3).tolist() == expected


def test_war_and_uar_on_an_imbalanced_set():
    # 8 neutral (all right), 2 happiness (1 right), 0 sadness in the targets.
    targets = torch.tensor([0] * 8 + [1] * 2)
    preds = torch.tensor([0] * 8 + [1, 2])
    metrics = summarize(confusion_matrix(preds, targets, 3), NAMES)
    assert metrics["war"] == pytest.approx(9 / 10)               # accuracy over images
    assert metrics["uar"] == pytest.approx((8 / 8 + 1 / 2) / 2)  # mean recall of the classes present
    assert metrics["per_class_recall"] == pytest.approx({"neutral": 1.0, "happiness": 0.5})
    assert metrics["support"] == {"neutral": 8, "happiness": 2, "sadness": 0}
    assert metrics["num_samples"] == 10 and metrics["confusion"][1] == [0, 1, 1]


def test_uar_differs_from_war_when_the_big_class_is_wrong():
    targets = torch.tensor([0] * 9 + [1])
    preds = torch.tensor([1] * 9 + [1])  # everything predicted happiness
    metrics = summarize(confusion_matrix(preds, targets, 3), NAMES)
    assert metrics["war"] == pytest.approx(0.1) and metrics["uar"] == pytest.approx(0.5)


def test_report_shows_the_numbers():
    metrics = summarize(confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 3), NAMES)
    report = format_report(metrics)
    assert "WAR 66.67%  UAR 66.67%  (3 images)" in report
    assert "rows: true, columns: predicted" in report
    assert report.splitlines()[-1].split() == ["sadness", "0", "1", "0"]
