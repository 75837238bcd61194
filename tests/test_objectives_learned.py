"""The learned objectives load local checkpoints offline: a tiny random CLIP saved here, scored
against the cosine similarity of its own image and text embeddings computed by hand."""

import json

import numpy as np
import pytest
import torch

from dit_accel.evals import objectives


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16, logit_scale_init_value=2.0)
    CLIPModel(config).save_pretrained(d)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(d)
    return d


@pytest.mark.parametrize("kind", ["clip", "pickscore"])
def test_clip_scores_are_scaled_cosines_of_the_frames(tiny_clip, kind):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(0)
    videos = [rng.random((3, 40, 40, 3)), rng.random((1, 40, 40, 3)) * 0.5]
    prompts = ["a red circle", "a blue square"]
    got = objectives.load_objective(f"{kind}:{tiny_clip}")(videos, prompts)
    model, processor = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    scale = float(model.logit_scale.detach().exp()) if kind == "pickscore" else 100.0
    for video, prompt, score in zip(videos, prompts, got):
        sims = []
        for frame in video:
            image = Image.fromarray(np.round(frame.astype(np.float32) * 255).astype(np.uint8))
            with torch.no_grad():
                out = model(**processor(text=[prompt], images=[image], return_tensors="pt", padding=True))
            sims.append(float(torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)[0]))
        assert score == pytest.approx(scale * np.mean(sims), rel=1e-4, abs=1e-4)


def test_learned_objectives_need_local_weights(tmp_path):
    with pytest.raises(ValueError, match="not a local transformers checkpoint directory"):
        objectives.check_objective(f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="not a local checkpoint file"):
        objectives.check_objective(f"imagereward:{tmp_path / 'reward.pt'}")


def _imagereward_files(folder, config: bool = True):
    """A (placeholder) ImageReward checkpoint in `folder`, with its med_config.json unless not `config`."""
    checkpoint = folder / "ImageReward.pt"
    checkpoint.write_bytes(b"weights")
    if config:
        (folder / "med_config.json").write_text("{}")
    return checkpoint


def test_imagereward_needs_its_config_next_to_the_checkpoint(tmp_path):
    checkpoint = _imagereward_files(tmp_path, config=False)
    with pytest.raises(ValueError, match=r"med_config\.json .* must lie next to the checkpoint"):
        objectives.check_objective(f"imagereward:{checkpoint}")
    (tmp_path / "med_config.json").write_text("{}")
    objectives.check_objective(f"imagereward:{checkpoint}")


def test_imagereward_glue_scores_the_mean_reward_of_the_picked_frames(tmp_path, monkeypatch):
    """The image-reward package's own model needs hub files; a stand-in with its API (``load``, and
    ``score(prompt, images)`` returning one reward per image, a bare float for one image) checks
    what this project adds: the local config passed, the frames picked and the rewards averaged."""
    import sys
    import types

    from PIL import Image

    checkpoint = _imagereward_files(tmp_path)
    loaded = {}

    class Model:
        def score(self, prompt, images):
            assert isinstance(images, list) and all(isinstance(i, Image.Image) for i in images)
            rewards = [float(np.asarray(i, dtype=np.float64).mean()) / 255 + len(prompt) for i in images]
            return rewards if len(rewards) > 1 else rewards[0]

    def load(name, device="cpu", download_root=None, med_config=None):
        loaded.update(name=name, device=device, med_config=med_config)
        return Model()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    rng = np.random.default_rng(1)
    videos = [rng.random((20, 8, 8, 3)), rng.random((1, 8, 8, 3))]
    prompts = ["a red circle", "sq"]
    got = objectives.load_objective(f"imagereward:{checkpoint}")(videos, prompts)
    assert loaded["name"] == str(checkpoint) and loaded["med_config"] == str(tmp_path / "med_config.json")
    # independently: 8 evenly spaced frames of the 20 (first and last included), each rounded to 8 bits
    picks = [np.round(np.linspace(0, 19, 8)).astype(int), [0]]
    for video, prompt, idx, score in zip(videos, prompts, picks, got):
        frames = [np.round(video[i] * 255).astype(np.uint8) for i in idx]
        expect = np.mean([f.astype(np.float64).mean() / 255 + len(prompt) for f in frames])
        assert score == pytest.approx(expect, rel=1e-12)


def test_imagereward_offline_failure_names_the_tokenizer(tmp_path, monkeypatch):
    import sys
    import types

    checkpoint = _imagereward_files(tmp_path)

    def load(name, device="cpu", download_root=None, med_config=None):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files of bert-base-uncased")

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    with pytest.raises(ValueError, match="bert-base-uncased tokenizer in the local Hugging Face cache"):
        objectives.load_objective(f"imagereward:{checkpoint}")
