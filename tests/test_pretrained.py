"""from_pretrained on files the tests write in the official layouts (random weights, no network)."""

import argparse
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from minilib import pretrained, zoo
from minilib.datasets import DownloadError
from minilib.pretrained import Checkpoint, CheckpointError, from_pretrained, read_state_dict

NAME = "small-kl-vae"  # a small zoo model stands in for the full-size ones


def random_state_dict(seed):
    torch.manual_seed(seed)
    return {key: torch.randn_like(value) for key, value in zoo.build(NAME).state_dict().items()}


@pytest.fixture
def publish(tmp_path, monkeypatch):
    """Write a file as the authors publish it and register it for NAME, served from a file:// URL."""
    monkeypatch.delenv(pretrained.OFFLINE_ENV, raising=False)
    cache = tmp_path / "cache"

    def _publish(content, filename="official.pth", **checkpoint):
        source = tmp_path / "server" / filename
        source.parent.mkdir(exist_ok=True)
        if filename.endswith(".safetensors"):
            save_file(content, str(source))
        else:
            torch.save(content, source)
        monkeypatch.setitem(pretrained.CHECKPOINTS, NAME, Checkpoint(source.as_uri(), filename, **checkpoint))
        return source, cache

    return _publish


def assert_weights(model, expected):
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)


def test_mar_layout_loads_the_ema_weights_strictly(publish):
    ema = random_state_dict(1)
    source, cache = publish({"model": random_state_dict(0), "model_ema": ema, "epoch": 400,
                             "args": argparse.Namespace(model="mar_base", lr=8e-4)}, wrapper_key="model_ema")
    model = from_pretrained(NAME, cache=cache)
    assert_weights(model, ema)
    assert not model.training
    cached = cache / "official.pth"
    assert cached.read_bytes() == source.read_bytes() and not list(cache.glob("*.part"))


def test_dit_layout_takes_ema_when_present_else_the_raw_dict(publish):
    raw = random_state_dict(2)
    _, cache = publish(raw, wrapper_key=("ema", None))
    assert_weights(from_pretrained(NAME, cache=cache), raw)
    wrapped = random_state_dict(3)
    _, cache2 = publish({"ema": wrapped}, filename="wrapped.pt", wrapper_key=("ema", None))
    assert_weights(from_pretrained(NAME, cache=cache2), wrapped)


def test_sd3_layout_strips_the_prefix_and_ignores_other_models(publish):
    vae = random_state_dict(4)
    content = {f"first_stage_model.{key}": value.contiguous() for key, value in vae.items()}
    content["model.diffusion_model.x_embedder.proj.weight"] = torch.zeros(3, 3)
    _, cache = publish(content, filename="sd3.safetensors", prefix="first_stage_model.")
    assert_weights(from_pretrained(NAME, cache=cache), vae)


def test_a_cached_file_is_used_without_downloading(publish, monkeypatch):
    weights = random_state_dict(5)
    source, cache = publish(weights)
    from_pretrained(NAME, cache=cache)
    source.unlink()                      # the "server" is gone, the cache still works
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "1")
    assert_weights(from_pretrained(NAME, cache=cache), weights)


def test_a_wrong_checksum_is_refused_and_leaves_nothing(publish):
    source, cache = publish(random_state_dict(6), sha256="0" * 64)
    with pytest.raises(DownloadError, match="SHA256 is not 0000.*download was deleted"):
        from_pretrained(NAME, cache=cache)
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name != ".locks"]
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    pretrained.CHECKPOINTS[NAME] = Checkpoint(source.as_uri(), "official.pth", sha256=good)
    assert pretrained.download_checkpoint(NAME, cache).is_file()


def test_offline_fails_at_once_naming_the_url_and_the_cache_path(publish, monkeypatch):
    _, cache = publish(random_state_dict(7))
    monkeypatch.setenv(pretrained.OFFLINE_ENV, "1")
    with pytest.raises(DownloadError) as error:
        from_pretrained(NAME, cache=cache)
    message = str(error.value)
    assert "file://" in message and str(cache / "official.pth") in message


def test_an_unreachable_host_raises_a_download_error(tmp_path, monkeypatch):
    monkeypatch.delenv(pretrained.OFFLINE_ENV, raising=False)
    monkeypatch.setitem(pretrained.CHECKPOINTS, NAME, Checkpoint("http://127.0.0.1:9/nothing.pth", "x.pth"))
    with pytest.raises(DownloadError, match=r"127\.0\.0\.1:9.*put the file at"):
        pretrained.download_checkpoint(NAME, tmp_path, timeout=5)


def test_a_gated_file_without_a_token_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(pretrained.OFFLINE_ENV, raising=False)
    monkeypatch.delenv(pretrained.TOKEN_ENV, raising=False)
    with pytest.raises(DownloadError, match="gated.*HF_TOKEN"):
        pretrained.download_checkpoint("sd3-vae", tmp_path)


def test_a_corrupted_file_is_reported_as_damaged(publish):
    source, cache = publish(random_state_dict(8))
    cache.mkdir()
    (cache / "official.pth").write_bytes(source.read_bytes()[: 2000])  # a truncated download
    with pytest.raises(CheckpointError, match="damaged"):
        from_pretrained(NAME, cache=cache)
    (cache / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a checkpoint: it looks like a text file"):
        read_state_dict(cache / "broken.safetensors")
    save_file({"w": torch.ones(1000)}, str(cache / "cut.safetensors"))
    whole = (cache / "cut.safetensors").read_bytes()
    (cache / "cut.safetensors").write_bytes(whole[:-1000])  # the header is intact, the data cut short
    with pytest.raises(CheckpointError, match="damaged"):
        read_state_dict(cache / "cut.safetensors")


def test_wrong_keys_are_listed(publish):
    weights = random_state_dict(9)
    weights["encoder.conv_in.weigth"] = weights.pop("encoder.conv_in.weight")
    weights["decoder.conv_out.bias"] = torch.zeros(7)
    _, cache = publish(weights)
    with pytest.raises(CheckpointError) as error:
        from_pretrained(NAME, cache=cache)
    message = str(error.value)
    assert "missing from the checkpoint" in message and "encoder.conv_in.weight" in message
    assert "unexpected in the checkpoint" in message and "weigth" in message
    assert "decoder.conv_out.bias: model (3,), checkpoint (7,)" in message


class NotATensor:
    pass


def test_pickled_objects_are_not_run(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path, "model")


def test_a_missing_wrapper_key_lists_what_is_there(tmp_path):
    path = tmp_path / "a.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match=r"no entry 'model_ema'.*\['state_dict'\]"):
        read_state_dict(path, "model_ema")


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="dit-xl-2"):
        pretrained.checkpoint_info("dit-xxl-2")


def test_ignored_keys_are_dropped(publish):
    weights = random_state_dict(10)
    _, cache = publish({**weights, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(3)},
                       ignore=("model_ema.",))
    assert_weights(from_pretrained(NAME, cache=cache), weights)


def test_the_stable_diffusion_vae_has_its_known_size():
    assert zoo.count_parameters(zoo.build("sd-vae-ft-ema", device="meta")) == 83_653_863


def test_every_published_checkpoint_belongs_to_a_zoo_model_with_a_paper():
    for name in pretrained.CHECKPOINTS:
        assert zoo.get(name).paper.startswith("https://arxiv.org/abs/"), name


def test_the_zoo_has_every_full_size_model_the_book_runs():
    required = ["var-d16", "var-d20", "var-d24", "var-d30", "var-vqvae", "mar-base", "mar-large", "mar-huge",
                "mar-kl16-vae", "dit-xl-2", "dit-b-2", "dit-s-2", "sd3-medium-mmdit", "sd3-vae", "vfsddpm-cifar100"]
    for name in required:
        assert zoo.count_parameters(zoo.build(name, device="meta")) > 10_000_000, name


# --- hardening: broken downloads, misnamed files, dtypes, the registry -------------------

HTML = b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Sign in to continue</body></html>\n"


def test_an_html_page_in_the_cache_is_diagnosed_moved_aside_and_fetched_again(publish):
    weights = random_state_dict(11)
    _, cache = publish(weights)
    cache.mkdir()
    (cache / "official.pth").write_bytes(HTML)             # a broken download from an older version
    with pytest.raises(CheckpointError) as error:
        read_state_dict(cache / "official.pth")
    message = str(error.value)
    assert "is not a checkpoint: it looks like an HTML page" in message and "Delete" in message
    assert "weights_only" not in message                   # no advice to unpickle what is not a checkpoint
    with pytest.warns(UserWarning, match=r"is not a checkpoint \(it looks like an HTML page.*moved it to .*\.damaged"):
        model = from_pretrained(NAME, cache=cache)
    assert_weights(model, weights)
    assert (cache / "official.pth.damaged").read_bytes() == HTML


def test_a_server_that_sends_a_web_page_stores_nothing(publish):
    _, cache = publish(random_state_dict(12))
    page = cache.parent / "server" / "official.pth"        # served as .pth (no text/html header)
    page.write_bytes(HTML)
    with pytest.raises(DownloadError, match=r"gave a file that is not a checkpoint \(it looks like an HTML page"):
        from_pretrained(NAME, cache=cache)
    assert not (cache / "official.pth").exists() and not list(cache.glob("*.part"))
    html_page = cache.parent / "server" / "login.html"     # served as text/html: refused before saving
    html_page.write_bytes(HTML)
    pretrained.CHECKPOINTS[NAME] = Checkpoint(html_page.as_uri(), "official.pth")
    with pytest.raises(DownloadError, match=r"web page \(text/html\)"):
        pretrained.download_checkpoint(NAME, cache)


def test_a_safetensors_file_named_pt_is_read_by_its_content(tmp_path):
    weights = {key: value.contiguous() for key, value in random_state_dict(13).items()}
    path = tmp_path / "weights.pt"
    save_file(weights, str(path))
    loaded = read_state_dict(path)
    assert loaded.keys() == weights.keys()
    torch.testing.assert_close(loaded["encoder.conv_in.weight"], weights["encoder.conv_in.weight"])


@pytest.mark.parametrize("content, looks_like", [
    (b"", "an empty file"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "a Git LFS pointer"),
    (b'{"error": "Repository not found"}', "a text file"),
    (b"\x1f\x8b\x08\x00" + bytes(range(40)), "a gzip archive"),
])
def test_files_that_are_not_checkpoints_get_a_diagnosis(tmp_path, content, looks_like):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"not a checkpoint: it looks like {looks_like}"):
        read_state_dict(path)


def test_a_cached_file_of_the_wrong_size_is_moved_aside_and_fetched_again(publish):
    weights = random_state_dict(14)
    source, cache = publish(weights)
    size = source.stat().st_size
    pretrained.CHECKPOINTS[NAME] = Checkpoint(source.as_uri(), "official.pth", size=size)
    cache.mkdir()
    (cache / "official.pth").write_bytes(source.read_bytes()[:-100])     # a truncated copy
    with pytest.warns(UserWarning, match=rf"has {size - 100:,} bytes, but the official file has {size:,}"):
        assert_weights(from_pretrained(NAME, cache=cache), weights)
    assert (cache / "official.pth").stat().st_size == size
    pretrained.CHECKPOINTS[NAME] = Checkpoint(source.as_uri(), "other.pth", size=size + 1)
    with pytest.raises(DownloadError, match="but the file has"):      # the download itself is checked too
        pretrained.download_checkpoint(NAME, cache)
    assert not (cache / "other.pth").exists()


def test_integer_tensors_for_float_weights_are_refused(publish):
    weights = random_state_dict(15)
    weights["encoder.conv_in.weight"] = torch.zeros_like(weights["encoder.conv_in.weight"], dtype=torch.int64)
    _, cache = publish(weights)
    expected = r"encoder\.conv_in\.weight: model torch\.float32, checkpoint torch\.int64"
    with pytest.raises(CheckpointError, match=expected):
        from_pretrained(NAME, cache=cache)


def test_a_float16_file_loads_into_the_float32_model(publish):
    weights = {key: value.half() if value.is_floating_point() else value
               for key, value in random_state_dict(16).items()}
    _, cache = publish(weights)
    model = from_pretrained(NAME, cache=cache)
    assert_weights(model, {key: value.float() if value.is_floating_point() else value
                           for key, value in weights.items()})


def test_a_cache_folder_that_cannot_be_written_says_how_to_choose_another(publish):
    _, cache = publish(random_state_dict(17))
    blocker = cache.parent / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(DownloadError, match=rf"cannot write into the folder {blocker / 'cache'}.*MINILIB_CACHE"):
        from_pretrained(NAME, cache=blocker / "cache")


def test_registry_checksums_are_well_formed_and_documented():
    with_hash = {name for name, info in pretrained.CHECKPOINTS.items() if info.sha256}
    assert with_hash == {"var-vqvae", "var-d16"}
    for name in with_hash:
        digest = pretrained.CHECKPOINTS[name].sha256
        assert len(digest) == 64 and set(digest) <= set("0123456789abcdef"), name
        assert name in pretrained.__doc__, f"{name}: say where its hash comes from"
    assert pretrained.CHECKPOINTS["var-vqvae"].size == 436_075_834
    for info in pretrained.CHECKPOINTS.values():   # an exact size, where given, agrees with the rough one
        assert info.size is None or abs(info.size / 1e6 - info.size_mb) < 0.01 * info.size_mb
