"""Tests of the local Hub stand-in (tests/hub_server.py), driven by real huggingface_hub/transformers
clients running in subprocesses (their Hub settings are read from the environment at import time)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from hub_server import LocalHub


def run_client(hub: LocalHub, tmp_path: Path, code: str, *args: str, timeout: float = 120, **env_kwargs) -> dict:
    """Run `code` in a fresh interpreter wired to `hub`; it must print one JSON object as its last line."""
    env = hub.client_env(tmp_path / "hf_home", **env_kwargs)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"client failed ({proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n"
        f"--- hub log\n{hub.log}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tmp_path):
    with LocalHub(tmp_path / "hub") as hub:
        yield hub


def test_create_repo_twice_with_exist_ok(hub, tmp_path):
    out = run_client(
        hub,
        tmp_path,
        """
        import json
        from huggingface_hub import create_repo
        a = create_repo("user/demo", exist_ok=True)
        b = create_repo("user/demo", exist_ok=True)
        c = create_repo("bare", exist_ok=True)  # no namespace: the token's user
        try:
            create_repo("user/demo")  # exist_ok=False must fail
            conflict = None
        except Exception as e:
            conflict = e.response.status_code
        print(json.dumps({"ids": [a.repo_id, b.repo_id, c.repo_id], "url": str(a), "conflict": conflict}))
        """,
    )
    assert out["ids"] == ["user/demo", "user/demo", "user/bare"]
    assert out["url"] == f"{hub.url}/user/demo"
    assert out["conflict"] == 409
    creates = [status for method, path, status in hub.log if (method, path) == ("POST", "/api/repos/create")]
    assert creates == [200, 409, 200, 409]
    assert hub.repo_dir("user/demo").is_dir() and hub.repo_dir("user/bare").is_dir()
    assert [c.message for c in hub.commits("user/demo")] == ["initial commit"]
    assert hub.unhandled == []


def _make_folder(folder: Path) -> dict[str, bytes]:
    files = {
        "notes.txt": b"hello hub\n",
        "nested/deeper/config.json": b'{"a": 1}\n',
        "weights.bin": os.urandom(12 * 1024 * 1024 + 7),  # above the Hub's 10 MB LFS threshold
    }
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return files


@pytest.mark.parametrize("disable_xet", [True, False], ids=["xet-disabled", "xet-enabled"])
def test_upload_folder_roundtrip(hub, tmp_path, disable_xet):
    folder = tmp_path / "folder"
    files = _make_folder(folder)
    out = run_client(
        hub,
        tmp_path,
        """
        import json, sys
        from huggingface_hub import create_repo, upload_folder, list_repo_files, hf_hub_download
        create_repo("user/demo", exist_ok=True)
        info = upload_folder(folder_path=sys.argv[1], repo_id="user/demo", commit_message="first upload")
        listed = list_repo_files("user/demo")
        downloaded = hf_hub_download("user/demo", "nested/deeper/config.json")
        try:
            hf_hub_download("user/demo", "missing.txt")
            missing = None
        except Exception as e:
            missing = type(e).__name__
        print(json.dumps({"oid": info.oid, "url": info.commit_url, "listed": listed,
                          "downloaded": open(downloaded).read(), "missing": missing}))
        """,
        str(folder),
        disable_xet=disable_xet,
    )
    repo = hub.repo_dir("user/demo")
    assert tree_bytes(repo) == files
    commits = hub.commits("user/demo")
    assert [c.message for c in commits] == ["initial commit", "first upload"]
    assert commits[-1].added == tuple(sorted(files)) and commits[-1].deleted == ()
    assert out["oid"] == commits[-1].oid
    assert out["url"] == f"{hub.url}/user/demo/commit/{commits[-1].oid}"
    assert sorted(out["listed"]) == sorted(files)
    assert out["downloaded"] == files["nested/deeper/config.json"].decode()
    assert out["missing"] == "RemoteEntryNotFoundError"
    # Content went inline through preupload + commit: no LFS/Xet endpoint was needed.
    assert ("POST", "/api/models/user/demo/preupload/main") in hub.requests
    assert ("POST", "/api/models/user/demo/commit/main") in hub.requests
    assert hub.unhandled == []


def test_upload_folder_delete_patterns(hub, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    files = _make_folder(first)
    (second / "nested/deeper").mkdir(parents=True)
    (second / "nested/deeper/config.json").write_bytes(b'{"a": 2}\n')
    (second / "fresh.txt").write_bytes(b"new file\n")
    run_client(
        hub,
        tmp_path,
        """
        import json, sys
        from huggingface_hub import create_repo, delete_folder, upload_folder
        create_repo("user/demo", exist_ok=True)
        upload_folder(folder_path=sys.argv[1], repo_id="user/demo", commit_message="one")
        upload_folder(folder_path=sys.argv[2], repo_id="user/demo", commit_message="two", delete_patterns=["*.txt"])
        delete_folder("nested", repo_id="user/demo", commit_message="three")
        print(json.dumps({}))
        """,
        str(first),
        str(second),
    )
    repo = hub.repo_dir("user/demo")
    assert tree_bytes(repo) == {
        "fresh.txt": b"new file\n",  # matches the pattern but is uploaded by the same commit: kept
        "weights.bin": files["weights.bin"],
    }
    two, three = hub.commits("user/demo")[-2:]
    assert two.message == "two"
    assert two.deleted == ("notes.txt",)  # the delete_patterns match
    assert two.added == ("fresh.txt", "nested/deeper/config.json")
    assert three.message == "three"
    assert three.deleted == ("nested/deeper/config.json",) and three.added == ()
    assert not (repo / "notes.txt").exists() and not (repo / "nested").exists()
    assert hub.unhandled == []


TRANSFORMERS_CLIENT = """
import hashlib, json, sys, torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

repo_dir, out_dir = sys.argv[1], sys.argv[2]
config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=32, num_labels=3)
result = {}

# (a) PreTrainedModel.push_to_hub, then reload from the files the server stored.
torch.manual_seed(0)
model = BertForSequenceClassification(config)
info = model.push_to_hub("user/tiny", commit_message="push tiny bert")
loaded, loading = BertForSequenceClassification.from_pretrained(repo_dir, output_loading_info=True)
original, reloaded = model.state_dict(), loaded.state_dict()
result["push"] = {
    "oid": info.oid,
    "missing": sorted(loading["missing_keys"]),
    "unexpected": sorted(loading["unexpected_keys"]),
    "mismatched": sorted(k for k in original if k not in reloaded or not torch.equal(original[k], reloaded[k])),
    "n_tensors": len(original),
    "digests": {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                for k, v in original.items()},
}
# Second push: the client downloads the remote README.md to re-tag it, and skips unchanged files.
info = model.push_to_hub("user/tiny", commit_message="retag", tags=["localhub-test"])
result["retag"] = {"oid": info.oid}

# (b) Trainer: init_hf_repo (repo name without namespace), checkpoint pushes, final push_to_hub.
torch.manual_seed(0)
data = [{"input_ids": torch.randint(0, 64, (8,)), "labels": torch.tensor(i % 3)} for i in range(8)]
args = TrainingArguments(
    output_dir=out_dir, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2,
    push_to_hub=True, hub_model_id="trained", hub_strategy="checkpoint", report_to=[], use_cpu=True,
    disable_tqdm=True,
)
trainer = Trainer(model=BertForSequenceClassification(config), args=args, train_dataset=data)
trainer.train()
info = trainer.push_to_hub(commit_message="End of training")
result["trainer"] = {"hub_model_id": trainer.hub_model_id, "oid": info.oid}
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def transformers_push(tmp_path_factory):
    """One client process (importing transformers is the slow part) for both transformers tests."""
    tmp_path = tmp_path_factory.mktemp("transformers_push")
    with LocalHub(tmp_path / "hub") as hub:
        out = run_client(
            hub, tmp_path, TRANSFORMERS_CLIENT, str(hub.repo_dir("user/tiny")), str(tmp_path / "out"), timeout=300
        )
        yield hub, out


def safetensors_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's raw bytes, parsed without torch (8-byte header size, JSON header, data)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    data = raw[8 + size :]
    return {k: hashlib.sha256(data[v["data_offsets"][0] : v["data_offsets"][1]]).hexdigest() for k, v in header.items()}


def test_model_push_to_hub_and_reload(transformers_push):
    hub, out = transformers_push
    push = out["push"]
    repo = hub.repo_dir("user/tiny")
    assert {"config.json", "model.safetensors", "README.md"} <= set(tree_bytes(repo))
    assert "library_name: transformers" in (repo / "README.md").read_text()
    first, retag = hub.commits("user/tiny")[-2:]
    assert first.message == "push tiny bert" and first.oid == push["oid"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(first.added)
    # The re-tagging push read README.md back from the hub (HEAD + GET on /resolve/) and only changed it.
    assert retag.message == "retag" and retag.oid == out["retag"]["oid"]
    assert retag.added == ("README.md",) and retag.deleted == ()
    assert "localhub-test" in (repo / "README.md").read_text()
    assert ("GET", "/user/tiny/resolve/main/README.md", 200) in hub.log
    # from_pretrained(hub.repo_dir(...)) in the client: every tensor loaded, identical to the pushed model.
    assert push["missing"] == [] and push["unexpected"] == [] and push["mismatched"] == []
    assert push["n_tensors"] > 10
    # And independently: the stored weights file holds exactly the model's tensors, byte for byte.
    assert safetensors_digests(repo / "model.safetensors") == push["digests"]
    assert hub.unhandled == []


def test_trainer_push_to_hub(transformers_push):
    hub, out = transformers_push
    assert out["trainer"]["hub_model_id"] == "user/trained"
    files = set(tree_bytes(hub.repo_dir("user/trained")))
    assert {"config.json", "model.safetensors", "README.md", "training_args.bin"} <= files
    assert any(f.startswith("last-checkpoint/") for f in files)
    commits = hub.commits("user/trained")
    assert commits[-1].message == "End of training" and commits[-1].oid == out["trainer"]["oid"]
    assert "Training in progress, step 2" in [c.message for c in commits]
    assert hub.unhandled == []


def test_write_without_or_with_wrong_token_is_rejected(hub, tmp_path):
    out = run_client(
        hub,
        tmp_path,
        """
        import json
        from huggingface_hub import create_repo, upload_file
        from huggingface_hub.errors import HfHubHTTPError
        create_repo("user/demo", token="hf_dummy")
        results = {}
        for label, token in [("none", None), ("wrong", "hf_wrong")]:
            try:
                upload_file(path_or_fileobj=b"data", path_in_repo="x.txt", repo_id="user/demo", token=token)
                results[label] = None
            except HfHubHTTPError as e:
                results[label] = [e.response.status_code, str(e)]
        try:
            create_repo("user/other")
            results["create"] = None
        except HfHubHTTPError as e:
            results["create"] = [e.response.status_code, str(e)]
        print(json.dumps(results))
        """,
        token="",  # no HF_TOKEN in the client's environment
    )
    assert out["none"][0] == 401 and "missing 'Authorization: Bearer <token>' header" in out["none"][1]
    assert out["wrong"][0] == 401 and "Invalid credentials" in out["wrong"][1]
    assert out["create"][0] == 401
    assert not (hub.repo_dir("user/demo") / "x.txt").exists()
    assert [c.message for c in hub.commits("user/demo")] == ["initial commit"]
    assert ("model", "user/other") not in hub.repos()


def test_unknown_endpoint_is_a_named_404(hub):
    request = urllib.request.Request(f"{hub.url}/api/models/user/demo/refs?x=1", method="GET")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 404
    assert "GET /api/models/user/demo/refs" in json.loads(info.value.read())["error"]
    assert hub.unhandled == [("GET", "/api/models/user/demo/refs")]
    assert hub.requests == [("GET", "/api/models/user/demo/refs")]
