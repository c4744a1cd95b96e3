import numpy as np
import pytest

from pipeline import labels


def test_every_class_round_trips_through_its_heads():
    for c in range(18):
        mask, gender, age = labels.decompose(c)
        assert labels.class_index(mask, gender, age) == c
    classes = np.arange(18)
    assert (labels.class_index(*labels.decompose(classes)) == classes).all()


def test_class_math_matches_the_competition_definition():
    assert labels.class_index(0, 0, 0) == 0
    assert labels.class_index(2, 1, 2) == 17
    assert labels.class_index(1, 0, 1) == 7  # incorrect, male, 30-59


@pytest.mark.parametrize("age,old,band", [(18, 60, 0), (29, 60, 0), (30, 60, 1), (59, 60, 1), (60, 60, 2),
                                          (58, 59, 1), (59, 59, 2), (58, 58, 2)])
def test_age_bands_follow_the_configurable_old_cut(age, old, band):
    assert labels.age_band(age, old) == band


def test_image_names_map_to_mask_status():
    assert [labels.mask_of(s) for s in labels.IMAGE_STEMS] == [0, 0, 0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="mask6"):
        labels.mask_of("mask6")


def test_joint_from_heads_and_back_are_inverse():
    rng = np.random.default_rng(0)
    heads = {h: rng.dirichlet(np.ones(n), size=5) for h, n in labels.HEADS.items()}
    joint = labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])
    assert np.allclose(joint.sum(1), 1)
    # P(class) is the product of the heads, in class order
    assert np.isclose(joint[0, labels.class_index(1, 1, 2)], heads["mask"][0, 1] * heads["gender"][0, 1] * heads["age"][0, 2])
    back = labels.heads_from_joint(joint)
    for h in heads:
        assert np.allclose(back[h], heads[h])


def test_the_layout_functions_take_torch_tensors_too():
    import torch

    rng = np.random.default_rng(1)
    heads = {h: rng.dirichlet(np.ones(n), size=4) for h, n in labels.HEADS.items()}
    joint = labels.joint_from_heads(heads["mask"], heads["gender"], heads["age"])
    as_torch = labels.joint_from_heads(*(torch.tensor(heads[h]) for h in labels.HEADS))
    assert isinstance(as_torch, torch.Tensor) and np.allclose(as_torch.numpy(), joint)
    back = labels.heads_from_joint(torch.tensor(joint))
    assert all(np.allclose(back[h].numpy(), heads[h]) for h in labels.HEADS)


def test_multihead_logits_split_in_head_order_and_give_the_product_as_joint():
    import torch

    logits = torch.randn(5, labels.num_outputs("multihead"))
    parts = labels.split_logits(logits, "multihead")
    assert [parts[h].shape[1] for h in parts] == list(labels.HEADS.values()) == [3, 2, 3]
    assert torch.equal(torch.cat(list(parts.values()), 1), logits)
    probs = labels.probabilities(logits, "multihead")
    assert set(probs) == set(labels.TABLE_KEYS)
    expected = labels.joint_from_heads(probs["mask"], probs["gender"], probs["age"])
    assert torch.allclose(probs["joint"], expected) and torch.allclose(probs["joint"].sum(1), torch.ones(5))
    single = labels.probabilities(torch.randn(5, labels.NUM_CLASSES), "single")
    assert torch.allclose(single["mask"], single["joint"].reshape(5, 3, 2, 3).sum((2, 3)))
