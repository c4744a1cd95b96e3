"""The one staleness rule: missing / stale / fresh, the stamp written last and removed first."""
import pytest

from pipeline.artifacts import Artifact, require_all
from pipeline.errors import MissingArtifactError, StaleArtifactError


def artifact(folder, **identity) -> Artifact:
    return Artifact(what="test tables", folder=folder, identity={"config": {"train": {"lr": 0.1}}, **identity},
                    remedy="./run.sh infer -c CONFIG", outputs=("table.npz",))


def test_an_artifact_without_a_stamp_is_missing_and_names_the_command(tmp_path):
    status, message = artifact(tmp_path).state()
    assert status == "missing" and "run: ./run.sh infer -c CONFIG" in message
    with pytest.raises(MissingArtifactError, match="test tables: missing"):
        artifact(tmp_path).require()


def test_a_sealed_artifact_is_fresh_until_its_inputs_change(tmp_path):
    (tmp_path / "table.npz").write_bytes(b"one")
    artifact(tmp_path).seal()
    assert artifact(tmp_path).state()[0] == "fresh"
    changed = Artifact(what="test tables", folder=tmp_path, identity={"config": {"train": {"lr": 0.02}}},
                       remedy="./run.sh infer -c CONFIG", outputs=("table.npz",))
    status, message = changed.state()
    assert status == "stale" and "config.train.lr 0.1 -> 0.02" in message and "re-run: ./run.sh infer" in message
    with pytest.raises(StaleArtifactError, match="lr 0.1 -> 0.02"):
        changed.require()


def test_a_stamp_never_vouches_for_files_being_rewritten(tmp_path):
    (tmp_path / "table.npz").write_bytes(b"one")
    artifact(tmp_path).seal()
    artifact(tmp_path).invalidate()  # a stage about to rewrite the table; killed before it seals again
    (tmp_path / "table.npz").write_bytes(b"half")
    assert artifact(tmp_path).state()[0] == "missing"


def test_the_token_follows_the_output_files(tmp_path):
    (tmp_path / "table.npz").write_bytes(b"one")
    first = artifact(tmp_path).seal()["token"]
    (tmp_path / "table.npz").write_bytes(b"two")
    assert artifact(tmp_path).seal()["token"] != first


def test_a_stamped_artifact_whose_output_is_gone_is_incomplete(tmp_path):
    (tmp_path / "table.npz").write_bytes(b"one")
    artifact(tmp_path).seal()
    (tmp_path / "table.npz").unlink()
    status, message = artifact(tmp_path).state()
    assert status == "missing" and "table.npz missing" in message


def test_require_all_names_every_unusable_artifact(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "b" / "table.npz").write_bytes(b"x")
    artifact(tmp_path / "b").seal()
    with pytest.raises(MissingArtifactError, match=r"(?s)2 of 3.*a/done.json.*c/done.json"):
        require_all([artifact(tmp_path / n) for n in "abc"], "tables not usable")
