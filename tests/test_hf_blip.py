"""The HF BLIP family against transformers' own forward, SDPA against eager, and the tiny model."""

from __future__ import annotations

import contextlib
import http.server
import io
import shutil
import socket
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from blip_ops import hub, load_model
from blip_ops.attention import set_attention
from blip_ops.decode import decode_image
from blip_ops.hub import ModelUnavailableError
from blip_ops.tiny_model import build_vocab, make_tiny_model
from tests.conftest import draw_product

TITLES = [
    "M & D Simple Modern Light Luxury Sofa TE04",
    "er tong hua xing che fang ce fan niu niu che 1-3 sui",
    "儿童滑行车 防侧翻 扭扭车",
    "red leather handbag women",
    "blue cotton striped shirt men",
    "steel kettle 1.7L",
]


def _reference_inputs(model, texts):
    enc = model.tokenizer(
        [model.normalize_text(t) for t in texts],
        padding="longest",
        truncation=True,
        max_length=model.text_settings.max_length,
        return_tensors="pt",
    )
    return enc["input_ids"], enc["attention_mask"]


def test_split_encoders_equal_transformers_forward(tiny_model, eager_reference, product_images):
    pixels = tiny_model.preprocess(product_images[:4])  # (4, 3, S, S)
    ids, mask = _reference_inputs(tiny_model, TITLES[:4])
    with torch.no_grad():
        ref_itc = eager_reference(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False
        ).itm_score
        ref_itm = eager_reference(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=True
        ).itm_score
    img = tiny_model.encode_images(pixels, return_tokens=True)
    txt = tiny_model.encode_texts(TITLES[:4])
    # forward(use_itm_head=False) returns image_feat @ text_feat.T: (images, texts) cosines.
    torch.testing.assert_close(img.embeddings @ txt.T, ref_itc, atol=1e-5, rtol=0)
    # forward(use_itm_head=True) pairs text i with image i: 2-way logits, [:, 1] = "match".
    torch.testing.assert_close(
        tiny_model.itm_scores(TITLES[:4], img.tokens), ref_itm[:, 1], atol=1e-5, rtol=0
    )
    # One query against k images in one call equals the k pair-wise forwards.
    one = tiny_model.itm_scores(TITLES[0], img.tokens)
    ids1, mask1 = _reference_inputs(tiny_model, [TITLES[0]] * 4)
    with torch.no_grad():
        ref_one = eager_reference(
            input_ids=ids1, attention_mask=mask1, pixel_values=pixels
        ).itm_score[:, 1]
    torch.testing.assert_close(one, ref_one, atol=1e-5, rtol=0)


def test_itm_first_token_option_feeds_enc_like_the_original_code(
    tiny_model_dir, eager_reference, product_images, tmp_path
):
    """``itm_first_token="[ENC]"`` replaces [CLS] in ITM inputs (the original BLIP code's ITM
    input); ITC is untouched; the setting travels with the checkpoint and changes its id."""
    from dataclasses import replace

    from blip_ops.hf_blip import HFBlipModel

    base = load_model(tiny_model_dir, device="cpu", dtype="float32")
    assert "itm_first_token" not in base.text_settings.to_dict()  # old ids stay as they were
    enc_model = HFBlipModel(
        base.model, base.tokenizer, base.image_settings,
        replace(base.text_settings, itm_first_token="[ENC]"), device="cpu", dtype="float32",
    )  # fmt: skip
    assert enc_model.model_id != base.model_id
    pixels = enc_model.preprocess(product_images[:3])
    ids, mask = _reference_inputs(enc_model, TITLES[:3])
    ids[:, 0] = enc_model.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        ref = eager_reference(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score
    tokens = enc_model.encode_images(pixels, return_tokens=True).tokens
    got = enc_model.itm_scores(TITLES[:3], tokens)
    torch.testing.assert_close(got, ref[:, 1], atol=1e-5, rtol=0)
    assert not torch.allclose(got, base.itm_scores(TITLES[:3], tokens), atol=1e-4)
    torch.testing.assert_close(enc_model.encode_texts(TITLES[:3]), base.encode_texts(TITLES[:3]))
    again = load_model(enc_model.save(tmp_path / "enc"), device="cpu")
    assert again.text_settings.itm_first_token == "[ENC]"
    assert again.model_id == enc_model.model_id

    unknown = HFBlipModel(
        base.model, base.tokenizer, base.image_settings,
        replace(base.text_settings, itm_first_token="[NOPE]"), device="cpu", dtype="float32",
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"\[NOPE\].*not in this checkpoint's vocabulary"):
        unknown.itm_scores(TITLES[:1], tokens[:1])


def test_sdpa_equals_eager(tiny_model_dir, product_images):
    model = load_model(tiny_model_dir, device="cpu", dtype="float32", attention="sdpa")
    pixels = model.preprocess(product_images)
    sdpa = (model.encode_images(pixels, return_tokens=True), model.encode_texts(TITLES))
    sdpa_itm = model.itm_scores(TITLES[0], sdpa[0].tokens)
    assert (
        set_attention(model.model, "eager") == 2 + 2 * 2
    )  # 2 vision layers, 2 text layers x (self, cross)
    eager = (model.encode_images(pixels, return_tokens=True), model.encode_texts(TITLES))
    eager_itm = model.itm_scores(TITLES[0], eager[0].tokens)
    torch.testing.assert_close(sdpa[0].embeddings, eager[0].embeddings, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[0].tokens, eager[0].tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa[1], eager[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(sdpa_itm, eager_itm, atol=1e-5, rtol=0)


def test_sdpa_respects_text_padding(tiny_model):
    # A short title padded in a batch with a long one must embed as it does alone.
    alone = tiny_model.encode_texts(["red sofa"])
    padded = tiny_model.encode_texts(["red sofa", TITLES[1]])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_outputs_are_normalised_and_shaped(tiny_model, product_images):
    enc = tiny_model.encode_images(product_images, return_tokens=True)
    d = tiny_model.embedding_dim
    assert enc.embeddings.shape == (8, d) and enc.embeddings.dtype == torch.float32
    assert enc.tokens.shape == (8, (64 // 8) ** 2 + 1, 32)
    torch.testing.assert_close(enc.embeddings.norm(dim=-1), torch.ones(8))
    txt = tiny_model.encode_texts(TITLES)
    assert txt.shape == (len(TITLES), d)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(len(TITLES)))
    assert tiny_model.encode_images(product_images[:1]).tokens is None


def test_tiny_model_tells_inputs_apart(tiny_model, product_images):
    """A random BLIP with default init embeds everything alike."""
    img = tiny_model.encode_images(product_images).embeddings
    sim = img @ img.T
    off = sim[~torch.eye(len(sim), dtype=torch.bool)]
    assert off.max() < 0.9, f"images embed too alike: max off-diagonal cosine {off.max():.4f}"
    txt = tiny_model.encode_texts(TITLES)
    tsim = txt @ txt.T
    toff = tsim[~torch.eye(len(tsim), dtype=torch.bool)]
    assert toff.max() < 0.95, f"titles embed too alike: max off-diagonal cosine {toff.max():.4f}"
    # And ITM separates images for one query.
    itm = tiny_model.itm_scores(
        TITLES[0], tiny_model.encode_images(product_images, return_tokens=True).tokens
    )
    assert itm.std() > 0.05


def test_tokenizer_vocab_is_complete(tiny_model):
    """A tokenizer that silently loads 5 tokens turns every word into [UNK]."""
    tok = tiny_model.tokenizer
    assert len(tok) == len(build_vocab()) > 200
    ids = tok("simple modern sofa te04 xyz")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[1:4] == ["simple", "modern", "sofa"]


def test_model_id_names_weights_not_path(tiny_model_dir, tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere")
    assert load_model(copy, device="cpu").model_id == tiny_model.model_id
    assert tiny_model.model_id.startswith("hf_blip-")
    assert make_tiny_model(seed=0).model_id == tiny_model.model_id
    assert make_tiny_model(seed=1).model_id != tiny_model.model_id
    other = make_tiny_model(seed=0)
    with torch.no_grad():
        other.model.itm_head.bias[0] += 1.0
    saved = other.save(tmp_path / "changed")
    assert load_model(saved, device="cpu").model_id != tiny_model.model_id


def test_save_load_round_trip_keeps_outputs(tiny_model, tmp_path, product_images):
    again = load_model(tiny_model.save(tmp_path / "resaved"), device="cpu")
    assert again.model_id == tiny_model.model_id
    assert again.image_settings == tiny_model.image_settings
    assert again.text_settings == tiny_model.text_settings
    torch.testing.assert_close(
        again.encode_images(product_images[:2]).embeddings,
        tiny_model.encode_images(product_images[:2]).embeddings,
    )


def test_unreachable_hub_fails_at_once_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match=r"model\.name_or_path") as err:
        load_model("Salesforce/blip-itm-base-coco")
    assert time.perf_counter() - started < 2.0
    assert "Salesforce/blip-itm-base-coco" in str(err.value) and "--model" in str(err.value)


_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
               "NO_PROXY", "no_proxy")  # fmt: skip


@pytest.fixture
def hub_online(monkeypatch):
    """Hub probes as on a machine without HF_HUB_OFFLINE or proxy settings.

    huggingface_hub reads HF_HUB_OFFLINE at import (conftest sets it) and its shared session
    reads the proxy variables when created: so the flag is patched and the session recreated.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    close_session()
    yield
    close_session()


@contextlib.contextmanager
def _closing_tcp_server():
    """A TCP server on 127.0.0.1 that closes every connection at once: (port, set when one came)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)  # accept() wakes up to notice the test is over
    connected, stop = threading.Event(), threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            connected.set()
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], connected
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]  # closed on return: nothing listens there


def test_hub_probe_goes_through_the_https_proxy(hub_online, monkeypatch):
    with _closing_tcp_server() as (port, connected):
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")  # never reached: the proxy hangs up
        started = time.perf_counter()
        assert hub._hub_reachable() is False
        assert time.perf_counter() - started < hub._PROBE_TIMEOUT_S
        assert connected.wait(1), "the probe did not connect to HTTPS_PROXY"


def test_hub_probe_fails_within_the_timeout_when_nothing_listens(hub_online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    started = time.perf_counter()
    assert hub._hub_reachable() is False
    assert time.perf_counter() - started < hub._PROBE_TIMEOUT_S + 1


class _HeadOk(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # the name http.server dispatches HEAD to
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


def test_hub_probe_sees_an_endpoint_that_answers(hub_online, monkeypatch):
    """The probe is not vacuous: an endpoint that answers HEAD is reachable."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeadOk)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub._hub_reachable() is True
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_hub_without_offline_flag(hub_online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    started = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        load_model("Salesforce/blip-itm-base-coco")
    assert time.perf_counter() - started < 5.0


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelUnavailableError, match="no config.json"):
        load_model(tmp_path)


def test_exif_rotated_jpeg_embeds_like_upright_pixels(tiny_model):
    """An EXIF-rotated JPEG must embed as the same pixels stored upright (lossless PNG)."""
    # Small enough that draft() keeps full resolution, so both paths see identical pixels.
    stored = draw_product(3, size=(100, 70))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    jpeg = buf.getvalue()
    # What the JPEG decoder produced, turned upright by hand, stored losslessly.
    raw = Image.open(io.BytesIO(jpeg)).convert("RGB")
    upright = raw.transpose(Image.Transpose.ROTATE_270)
    png = io.BytesIO()
    upright.save(png, "PNG")
    size = tiny_model.image_settings.size
    from_jpeg = decode_image(jpeg, target_size=size)
    from_png = decode_image(png.getvalue(), target_size=size)
    assert from_jpeg.size == (70, 100)
    e = tiny_model.encode_images([from_jpeg, from_png, raw]).embeddings
    np.testing.assert_allclose(e[0].numpy(), e[1].numpy(), atol=1e-4)
    # Not vacuous: ignoring the orientation gives a different embedding.
    assert float(e[0] @ e[2]) < 0.999


def test_preprocess_matches_transformers_blip_image_processor(
    tiny_model_dir, tiny_model, product_images
):
    """Size, normalisation and resampling come from the checkpoint's preprocessor_config.json."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    processor = BlipImageProcessorPil.from_pretrained(tiny_model_dir)
    expected = processor(images=product_images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(tiny_model.preprocess(product_images), expected, atol=1e-5, rtol=0)


def test_tiny_model_cli_writes_a_loadable_checkpoint(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "cli-tiny"
    run = subprocess.run(
        [sys.executable, "-m", "blip_ops.tiny_model", "--out", str(out), "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    model = load_model(out, device="cpu")
    assert f"model_id: {model.model_id}" in run.stdout
    assert model.model_id == make_tiny_model(seed=3).model_id


def test_preprocess_takes_decoded_tensors_like_pil_images(tiny_model, product_images):
    """decode_batch's GPU path yields (3, H, W) uint8 tensors; they preprocess like PIL images."""
    tensors = [
        torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in product_images[:3]
    ]
    mixed = [tensors[0], product_images[1], tensors[2]]
    from_pil = tiny_model.preprocess(product_images[:3])
    from_mixed = tiny_model.preprocess(mixed)
    assert torch.equal(from_mixed[1], from_pil[1])
    # torch's antialiased bicubic differs from PIL's by rounding only: at most a few grey levels.
    assert (from_mixed - from_pil).abs().max() < 4 / 255 / min(tiny_model.image_settings.std)
    emb = tiny_model.encode_images(mixed).embeddings
    assert float((emb * tiny_model.encode_images(from_pil).embeddings).sum(-1).min()) > 0.99
    with pytest.raises(TypeError, match="expected an RGB PIL image"):
        tiny_model.preprocess([np.zeros((3, 4, 4))])


def test_small_preset_with_a_corpus_vocabulary(tmp_path):
    """The trainable preset: BERT's init (so weights are small), wider towers, and the corpus's
    frequent words as whole tokens, from train rows only; Chinese arrives as pinyin."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from blip_ops.tiny_model import corpus_words

    corpus = tmp_path / "pairs.parquet"
    pq.write_table(
        pa.table(
            {
                "split": ["train", "train", "test"],
                "title_en": ["Nordika Coffee Table", "Nordika coffee MUG", "Zylophon Lamp"],
                "title_zh": ["诺迪卡茶几", "诺迪卡杯子", "台灯"],
                "price": [1.0, 2.0, 3.0],  # not a title column: ignored
            }
        ),
        corpus,
    )
    words = corpus_words(["Nordika table", "nordika, TABLE!", "once"], size=10)
    assert words == ["nordika", "table"]  # seen twice; punctuation apart; lowercased
    assert corpus_words(["a b", "a b"], size=10) == []  # single characters have tokens already
    with pytest.raises(ValueError, match="vocabulary size must be >= 0"):
        corpus_words([], size=-1)

    out = tmp_path / "small"
    run = subprocess.run(
        [sys.executable, "-m", "blip_ops.tiny_model", "--out", str(out), "--preset", "small",
         "--vocab-corpus", str(corpus)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    model = load_model(out, device="cpu")
    tokens = model.tokenizer.tokenize(model_text(model, "Nordika 诺迪卡 coffee zylophon"))
    assert tokens[:5] == ["nordika", "nuo", "di", "ka", "coffee"]
    assert "zylophon" not in tokens  # a test-split word never enters the vocabulary
    config = model.model.config
    assert config.text_config.hidden_size == 128 and config.vision_config.num_hidden_layers == 4
    assert config.vision_config.initializer_range == 0.02
    weights = model.model.vision_model.encoder.layers[0].self_attn.qkv.weight
    assert 0.01 < float(weights.detach().std()) < 0.03  # BERT's init, not the tiny preset's 0.3

    bad = subprocess.run(
        [sys.executable, "-m", "blip_ops.tiny_model", "--out", str(tmp_path / "x"),
         "--vocab-corpus", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "missing.txt" in bad.stderr


def model_text(model, text: str) -> str:
    from blip_ops.text import normalize_text

    return normalize_text(text, model.text_settings)
