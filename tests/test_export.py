"""Export of trained `peft` trees: .npy / safetensors round trips, HF PEFT adapters loaded by PyTorch PEFT
with equal logits, the refused prefix export (and the measured reason), prompts back as 'file' inits, and
the export binary after a tiny training run."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_mix import export_formats as ef
from prompt_mix.peft import lora as lora_lib
from prompt_mix.peft import prefix_tuning as prefix_lib
from prompt_mix.peft import prompt_tuning as pt
from prompt_mix.t5 import config as config_lib
from prompt_mix.t5 import model as model_lib
from conftest import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 64
# v1.1 (gated, untied logits_dense) with h * d_kv != d and unequal depths.
CONFIG = config_lib.T5Config(vocab_size=VOCAB, emb_dim=16, num_heads=4, head_dim=6, mlp_dim=32,
                             num_encoder_layers=2, num_decoder_layers=3,
                             mlp_activations=("gelu", "linear"), logits_via_embedding=False,
                             dropout_rate=0.0)


def make_batch(seed=0):
  """3 examples, padded inputs, unpadded targets (HF and T5X mask padded targets differently)."""
  rng = np.random.RandomState(seed)
  enc = rng.randint(2, VOCAB, (3, 7))
  enc[0, 4:] = 0
  enc[2, 6:] = 0
  dec_in = np.concatenate([np.zeros((3, 1), int), rng.randint(2, VOCAB, (3, 4))], axis=1)
  tgt = np.concatenate([dec_in[:, 1:], np.ones((3, 1), int)], axis=1)
  return {k: jnp.asarray(v) for k, v in dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in,
                                              decoder_target_tokens=tgt).items()}


def init(model, batch, seed=0):
  """Unboxed variables with every peft leaf moved away from its init (so nothing is trivially zero)."""
  variables = nn.unbox(model.init(jax.random.PRNGKey(seed), batch))
  leaves, treedef = jax.tree_util.tree_flatten(variables["peft"])
  rng = np.random.RandomState(seed + 1)
  moved = [x + np.asarray(0.3 * rng.randn(*x.shape), x.dtype) for x in leaves]
  return dict(variables, peft=jax.tree_util.tree_unflatten(treedef, moved))


def logits(model, variables, batch):
  return np.asarray(model.logits(variables, batch))  # Eager: faster than compiling a tiny model.


def rel_err(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


def assert_trees_identical(a, b):
  fa, fb = ef.flatten_leaves(a), ef.flatten_leaves(b)
  assert fa.keys() == fb.keys()
  for key in fa:
    assert fa[key].dtype == fb[key].dtype and fa[key].shape == fb[key].shape, key
    assert fa[key].tobytes() == fb[key].tobytes(), key


def hf_logits(hf, adapter_dir, batch):
  """Logits of `PeftModel.from_pretrained(hf, adapter_dir)`, as a PyTorch user would run it."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  wrapped = peft.PeftModel.from_pretrained(hf, str(adapter_dir))
  wrapped.eval()
  enc = np.asarray(batch["encoder_input_tokens"])
  with torch.no_grad():
    return wrapped(input_ids=torch.tensor(enc), attention_mask=torch.tensor((enc > 0).astype(np.int64)),
                   decoder_input_ids=torch.tensor(np.asarray(batch["decoder_input_tokens"]))).logits.numpy()


def hf_backbone(config, params):
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from prompt_mix.t5 import hf_checkpoint  # pylint: disable=g-import-not-at-top
  return hf_checkpoint.hf_t5_model(config, params)


# ------------------------------------------------------------------------------------ npy / safetensors
def a_tree():
  rng = np.random.RandomState(0)
  return {
      "encoder": {"prompt_tuning": {"prompt": rng.randn(3, 5, 16).astype(np.float32)},  # A bank of 3.
                  "layers_0": {"attention": {"query": {"lora": {
                      "a": rng.randn(16, 2).astype(jnp.bfloat16),
                      "b": jnp.asarray(rng.randn(2, 24), jnp.float32)}}}}},  # A device array.
      "decoder": {"gate": {"scale": np.float32(1.5) * np.ones((), np.float32),  # A scalar.
                           "empty": np.zeros((0, 4), np.float32)}},
  }


def test_npy_round_trip_is_bit_identical(tmp_path):
  tree = a_tree()
  out = ef.save_npy(tree, tmp_path / "npy", method="test method", metadata={"step": 7})
  back = ef.load_npy(out)
  assert_trees_identical(back, tree)
  assert (tmp_path / "npy" / "encoder" / "prompt_tuning" / "prompt.npy").exists()  # Nested dirs.
  manifest = ef.read_npy_manifest(out)
  assert manifest["method"] == "test method" and manifest["metadata"] == {"step": 7}
  entry = {e["path"]: e for e in manifest["leaves"]}["encoder/layers_0/attention/query/lora/a"]
  assert entry == dict(path="encoder/layers_0/attention/query/lora/a",
                       file="encoder/layers_0/attention/query/lora/a.npy", shape=[16, 2], dtype="bfloat16")

  # Saving again replaces the directory as a whole; no temporary leftovers beside it.
  ef.save_npy({"x": {"y": np.ones(2, np.float32)}}, out)
  assert list(ef.flatten_leaves(ef.load_npy(out))) == ["x/y"]
  assert sorted(os.listdir(tmp_path)) == ["npy"]

  # A file that does not match its manifest is named.
  np.save(tmp_path / "npy" / "x" / "y.npy", np.ones(3, np.float32))
  with pytest.raises(ValueError, match=r"y\.npy: shape \[3\], but manifest.json says \[2\]"):
    ef.load_npy(out)
  with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
    ef.load_npy(tmp_path)


def test_safetensors_round_trip_is_bit_identical(tmp_path):
  tree = a_tree()
  delta = pt.PromptTuning(length=5, init="uniform", num_tasks=3)
  file = ef.save_safetensors(tree, tmp_path / "peft.safetensors", method=(delta,), metadata={"step": 3})
  assert_trees_identical(ef.load_safetensors(file), tree)
  metadata = ef.read_safetensors_metadata(file)
  assert metadata["format"] == "prompt_mix.peft" and metadata["step"] == "3"
  assert metadata["method"] == repr(delta)
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  with safe_open(file, framework="np") as f:
    assert "encoder/prompt_tuning/prompt" in set(f.keys())
  assert sorted(os.listdir(tmp_path)) == ["peft.safetensors"]


def test_exported_prompt_is_a_file_init(tmp_path):
  batch = make_batch()
  model = model_lib.EncoderDecoderModel(CONFIG, (pt.PromptTuning(length=5, init="uniform"),))
  trained = init(model, batch)
  ef.save_npy(trained, tmp_path / "npy")
  prompt_file = tmp_path / "npy" / "encoder" / "prompt_tuning" / "prompt.npy"
  transfer = model_lib.EncoderDecoderModel(
      CONFIG, (pt.PromptTuning(length=5, init="file", init_file=str(prompt_file)),))
  started = nn.unbox(transfer.init(jax.random.PRNGKey(9), batch))
  assert_trees_identical(started["peft"], trained["peft"])

  # One task of a bank, as the [m, d] file a single-task run starts from.
  bank = model_lib.EncoderDecoderModel(CONFIG, (pt.PromptTuning(length=5, init="uniform", num_tasks=3),))
  banked = init(bank, dict(batch, task_ids=jnp.zeros(3, jnp.int32)))
  path = ef.export_prompt_npy(banked, tmp_path / "task1.npy", task_index=1)
  one = model_lib.EncoderDecoderModel(CONFIG, (pt.PromptTuning(length=5, init="file", init_file=path),))
  np.testing.assert_array_equal(
      nn.unbox(one.init(jax.random.PRNGKey(0), batch))["peft"]["encoder"]["prompt_tuning"]["prompt"],
      banked["peft"]["encoder"]["prompt_tuning"]["prompt"][1])
  with pytest.raises(KeyError, match="no prompt leaf decoder/prompt_tuning/prompt"):
    ef.export_prompt_npy(banked, tmp_path / "x.npy", stack="decoder")


# ------------------------------------------------------------------------------------ HF PEFT
def test_prompt_tuning_adapter_loads_in_pytorch_peft(tmp_path):
  batch = make_batch()
  delta = pt.PromptTuning(length=5, init="uniform")
  model = model_lib.EncoderDecoderModel(CONFIG, (delta,))
  variables = init(model, batch)
  out = ef.save_peft_adapter(variables, model, tmp_path / "adapter", base_model_name_or_path="tiny-t5")
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"],
          config["num_transformer_submodules"], config["base_model_name_or_path"]) == (
              "PROMPT_TUNING", "SEQ_2_SEQ_LM", 5, 1, "tiny-t5")

  ours = logits(model, variables, batch)
  theirs = hf_logits(hf_backbone(CONFIG, variables["params"]), out, batch)
  plain = logits(model_lib.EncoderDecoderModel(CONFIG), {"params": variables["params"]}, batch)
  assert rel_err(ours, theirs) < 1e-5
  assert rel_err(plain, theirs) > 1e-3  # The prompt matters.

  # Back into the project, bit-identical, with the delta that declares exactly these leaves.
  assert_trees_identical(ef.load_peft_adapter(out), variables["peft"])
  assert ef.peft_adapter_delta(out, CONFIG) == delta


@pytest.mark.parametrize("peft_type", ["PROMPT_TUNING", "P_TUNING"])
def test_pytorch_prompt_adapters_initialize_ours(tmp_path, peft_type):
  """Adapters saved by PEFT itself (2 submodules by default: a [2m, d] table) read as their first m rows,
  the rows PEFT's seq2seq forward prepends to the encoder input (P-tuning saves its encoder's output)."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  batch = make_batch()
  model = model_lib.EncoderDecoderModel(CONFIG, (pt.PromptTuning(length=4, init="uniform"),))
  params = init(model, batch)["params"]
  torch.manual_seed(0)
  if peft_type == "PROMPT_TUNING":
    peft_config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
  else:
    peft_config = peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4,
                                           encoder_hidden_size=8)
  peft.get_peft_model(hf_backbone(CONFIG, params), peft_config).save_pretrained(tmp_path / "torch")
  tree = ef.load_peft_adapter(tmp_path / "torch")
  _, saved = ef.read_peft_adapter(tmp_path / "torch")
  assert saved["prompt_embeddings"].shape == (8, 16)
  np.testing.assert_array_equal(tree["encoder"]["prompt_tuning"]["prompt"], saved["prompt_embeddings"][:4])
  ef.export_prompt_npy(tree, tmp_path / "prompt.npy")  # -> PromptTuning(init='file') starts from it.
  assert np.load(tmp_path / "prompt.npy").shape == (4, 16)
  ours = logits(model, {"params": params, "peft": tree}, batch)
  assert rel_err(ours, hf_logits(hf_backbone(CONFIG, params), tmp_path / "torch", batch)) < 1e-5


@pytest.mark.parametrize("targets", [("query", "value"), ("key", "out", "wi_0", "wo", "logits_dense")])
def test_lora_adapter_loads_in_pytorch_peft(tmp_path, targets):
  batch = make_batch()
  delta = lora_lib.LoRA(rank=3, alpha=6.0, targets=targets, layers=(0, -1) if "key" in targets else "all")
  model = model_lib.EncoderDecoderModel(CONFIG, (delta,))
  variables = init(model, batch)
  out = ef.save_peft_adapter(variables, model, tmp_path / "adapter")
  config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 3, 6.0)
  assert "encoder.block.0.layer.0.SelfAttention." + ("q" if "query" in targets else "k") in (
      config["target_modules"])

  ours = logits(model, variables, batch)
  theirs = hf_logits(hf_backbone(CONFIG, variables["params"]), out, batch)
  plain = logits(model_lib.EncoderDecoderModel(CONFIG), {"params": variables["params"]}, batch)
  assert rel_err(ours, theirs) < 1e-5
  assert rel_err(plain, theirs) > 1e-3

  assert_trees_identical(ef.load_peft_adapter(out), variables["peft"])
  found = ef.peft_adapter_delta(out, CONFIG)
  assert (found.rank, found.scale) == (3, delta.scale)
  again = model_lib.EncoderDecoderModel(CONFIG, (found,))
  shapes = {k: v.shape for k, v in model_lib.flatten(nn.unbox(again.abstract_init(batch)["peft"])).items()}
  assert shapes == {k: v.shape for k, v in model_lib.flatten(variables["peft"]).items()}
  if "key" in targets:
    assert found.layers == (-1, 0)  # Layers 0 and -1 of stacks of 2 and 3 layers.


def test_a_bank_exports_one_task(tmp_path):
  batch = dict(make_batch(), task_ids=jnp.asarray([0, 1, 1], jnp.int32))
  delta = lora_lib.LoRA(rank=2, num_tasks=2)
  model = model_lib.EncoderDecoderModel(CONFIG, (delta,))
  variables = init(model, batch)
  with pytest.raises(ef.ExportError, match="holds 2 tasks .* pass task_index"):
    ef.save_peft_adapter(variables, model, tmp_path / "adapter")
  assert not (tmp_path / "adapter").exists()
  out = ef.save_peft_adapter(variables, model, tmp_path / "adapter", task_index=1)
  one = jax.tree_util.tree_map(lambda x: x[1], variables["peft"])
  assert_trees_identical(ef.load_peft_adapter(out), one)
  with pytest.raises(ValueError, match="task_index=2 is out of range"):
    ef.save_peft_adapter(variables, model, tmp_path / "x", task_index=2)


def test_methods_without_an_exact_adapter_are_refused(tmp_path):
  batch = make_batch()
  cases = [
      ((pt.PromptTuning(length=3, stack="decoder", init="uniform"),), "prepends rows to the decoder"),
      ((pt.PromptTuning(length=3, init="uniform"), lora_lib.LoRA(rank=2)), "holds one method"),
  ]
  for deltas, message in cases:
    model = model_lib.EncoderDecoderModel(CONFIG, deltas)
    with pytest.raises(ef.ExportError, match=message):
      ef.save_peft_adapter(init(model, batch), model, tmp_path / "adapter")
  assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------------ prefixes
def test_prefix_tuning_export_is_refused_naming_every_site(tmp_path):
  batch = make_batch()
  model = model_lib.EncoderDecoderModel(CONFIG, (prefix_lib.PrefixTuning(length=3, mlp_hidden=8),))
  with pytest.raises(ef.ExportError) as error:
    ef.save_peft_adapter(init(model, batch), model, tmp_path / "adapter")
  first, *rest = str(error.value).splitlines()
  assert "2 encoder self-attention sites: PEFT gives T5's encoder no prefix" in first
  assert "3 cross-attention sites: PEFT replaces the cross-attention cache" in first
  assert "3 decoder self-attention sites: HF T5 adds its relative position bias" in first
  assert "  decoder/layers_2/encoder_decoder_attention" in rest
  assert not (tmp_path / "adapter").exists()


def write_adapter(directory, adapter_config, tensors):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  os.makedirs(directory)
  (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
  safetensors_numpy.save_file(tensors, str(directory / "adapter_model.safetensors"), {"format": "pt"})


@pytest.mark.parametrize("reparameterize", [False, True])
def test_decoder_prefix_differs_from_peft_only_by_the_position_bias(tmp_path, reparameterize):
  """Why the refusal: PEFT's T5 prefix (decoder self-attention) equals ours exactly when the decoder's
  relative position bias is zero, and differs as soon as it is not (HF biases the prefix keys)."""
  config = dataclasses.replace(CONFIG, num_encoder_layers=3, num_decoder_layers=3)
  batch = make_batch()
  delta = prefix_lib.PrefixTuning(length=3, stacks=("decoder",), attentions=("self_attention",),
                                  reparameterize=reparameterize,
                                  mlp_hidden=8)
  model = model_lib.EncoderDecoderModel(config, (delta,))
  variables = init(model, batch)
  with pytest.raises(ef.ExportError, match="3 decoder self-attention sites"):
    ef.save_peft_adapter(variables, model, tmp_path / "refused")
  adapter_config, table = prefix_lib.peft_prefix_tuning_table(variables, model)
  write_adapter(tmp_path / "adapter", adapter_config, {"prompt_embeddings": table})

  ours = logits(model, variables, batch)
  theirs = hf_logits(hf_backbone(config, variables["params"]), tmp_path / "adapter", batch)
  assert rel_err(ours, theirs) > 1e-3  # Different models with a real position bias...

  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  params["decoder"]["relpos_bias"]["rel_embedding"] = jnp.zeros_like(
      params["decoder"]["relpos_bias"]["rel_embedding"])
  unbiased = dict(variables, params=params)
  ours = logits(model, unbiased, batch)
  theirs = hf_logits(hf_backbone(config, params), tmp_path / "adapter", batch)
  plain = logits(model_lib.EncoderDecoderModel(config), {"params": params}, batch)
  assert rel_err(ours, theirs) < 1e-5  # ...and the same one without it: the mapping itself is exact.
  assert rel_err(plain, theirs) > 1e-3

  # Reading PEFT's prefix back is explicit about being an approximation.
  with pytest.raises(ValueError, match="approximate_prefix=True"):
    ef.load_peft_adapter(tmp_path / "adapter")
  tree = ef.load_peft_adapter(tmp_path / "adapter", approximate_prefix=True)
  flat_delta = ef.peft_adapter_delta(tmp_path / "adapter", config, approximate_prefix=True)
  baked, _ = prefix_lib.bake(variables, (delta,)) if reparameterize else (variables, None)
  expected = {k.replace(f"/{delta.name}/", "/p_tuning_v2/"): v
              for k, v in ef.flatten_leaves(baked["peft"]).items()}
  assert ef.flatten_leaves(tree).keys() == expected.keys()
  for key, value in ef.flatten_leaves(tree).items():
    np.testing.assert_array_equal(value, np.asarray(expected[key], np.float32))
  assert isinstance(flat_delta, prefix_lib.PTuningV2)
  assert (flat_delta.stacks, flat_delta.attentions) == (("decoder",), ("self_attention",))


# ------------------------------------------------------------------------------------ restoring
def test_restore_checkpoint_picks_the_latest_a_step_or_the_best(tmp_path):
  from prompt_mix.training import checkpointing  # pylint: disable=g-import-not-at-top
  from prompt_mix.training import setup  # pylint: disable=g-import-not-at-top
  with checkpointing.TrainingCheckpointManager(tmp_path / "checkpoints", max_to_keep=None,
                                               best_metric="acc") as manager:
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.1)):
      manager.save(step, {"peft": {"p": np.full(2, step, np.float32)}, "opt_state": {}},
                   metrics={"acc": acc})
  target = {"p": jax.ShapeDtypeStruct((2,), jnp.float32)}
  for step, kwargs, expected in ((None, {}, 3), (1, {}, 1), ("best", {}, 2),
                                 ("best", dict(best_metric="acc", best_mode="min"), 3)):
    tree, restored = setup.restore_checkpoint(str(tmp_path), target, step, **kwargs)
    assert restored == expected and np.asarray(tree["p"]).tolist() == [expected] * 2
  with pytest.raises(FileNotFoundError, match=r"No training checkpoint 7 in .*checkpoints \(steps there"):
    setup.restore_checkpoint(str(tmp_path), target, 7)


# ------------------------------------------------------------------------------------ the binary
def _env():
  return subprocess_env(PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
                        XLA_FLAGS="--xla_force_host_platform_device_count=1")


def test_export_binary_after_a_tiny_run(tmp_path):
  import gin  # pylint: disable=g-import-not-at-top
  import prompt_mix_tasks  # pylint: disable=g-import-not-at-top,unused-import
  from prompt_mix import gin_utils  # pylint: disable=g-import-not-at-top
  from prompt_mix.training import trainer  # pylint: disable=g-import-not-at-top

  model_dir = tmp_path / "run"
  gin.clear_config()
  try:
    gin_utils.parse_gin_flags(
        gin_utils.default_gin_search_paths(),
        ["models/tiny_bytes.gin", "methods/prompt_tuning.gin", "runs/finetune.gin"],
        [f"MODEL_DIR = '{model_dir}'", "MIXTURE_OR_TASK_NAME = 'synthetic_max'", "TRAIN_STEPS = 2",
         "BATCH_SIZE = 4", "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 4}", "preset.vocab_size = 259",
         "PromptTuning.length = 4", "DROPOUT_RATE = 0.0", "CHECKPOINT_PERIOD = 2"],
        finalize_config=False)
    trainer.train(model_dir=str(model_dir), random_init_backbone=True, log_period=1)
  finally:
    gin.clear_config()
  assert (model_dir / "checkpoints" / "2" / "commit_success.txt").exists()
  assert "preset.vocab_size = 259" in (model_dir / "config.gin").read_text()

  export_dir = tmp_path / "export"
  args = [sys.executable, "-m", "prompt_mix.export", f"--gin_file={model_dir}/config.gin",
          f'--gin.MODEL_DIR="{model_dir}"', f'--gin.EXPORT_DIR="{export_dir}"',
          "--gin.EXPORT_FORMATS=['npy','safetensors','peft']", "--gin.CHECKPOINT_STEP=2"]
  proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  npy = ef.load_npy(export_dir / "npy")
  assert_trees_identical(ef.load_safetensors(export_dir / "peft.safetensors"), npy)
  prompt = npy["encoder"]["prompt_tuning"]["prompt"]
  assert prompt.shape == (4, 8) and prompt.dtype == np.float32
  assert_trees_identical(ef.load_peft_adapter(export_dir / "peft_adapter"), npy)
  assert ef.read_npy_manifest(export_dir / "npy")["metadata"]["step"] == 2
  assert "PromptTuning(length=4" in ef.read_safetensors_metadata(export_dir / "peft.safetensors")["method"]

  # The restored tree is the trained one: the library's own restore of the same checkpoint.
  from prompt_mix import partitioning  # pylint: disable=g-import-not-at-top
  from prompt_mix.training import setup  # pylint: disable=g-import-not-at-top
  model = model_lib.EncoderDecoderModel(config_lib.preset("tiny", vocab_size=259, dropout_rate=0.0),
                                        (pt.PromptTuning(length=4),))
  batch = setup.dummy_batch({"encoder_input_tokens": (1, 16), "decoder_input_tokens": (1, 4),
                             "decoder_target_tokens": (1, 4)})
  restored, step = setup.restore_checkpoint(
      str(model_dir), setup.abstract_trainable(model, batch, partitioning.make_mesh(1)))
  assert step == 2
  assert_trees_identical(restored, npy)

  # No checkpoint: one line naming the directory, nothing written.
  empty = tmp_path / "nothing"
  args[4:6] = [f'--gin.MODEL_DIR="{empty}"', f'--gin.EXPORT_DIR="{tmp_path / "export2"}"']
  proc = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert fatal == [f"FATAL: FileNotFoundError: No training checkpoints in {empty}/checkpoints (is MODEL_DIR "
                   "the training run's?)  (--verbosity=1 shows the traceback)"]
  assert not (tmp_path / "export2").exists()
