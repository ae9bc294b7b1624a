"""LoRA adapters on a frozen base (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), via peft.

What a real-size model changes: a cycle that fine-tunes every weight holds the policy, a reference copy and
optimiser states for all of them, and every publish writes (and every API process loads) a full copy. With LoRA the
policy is the frozen base plus a few MB of low-rank updates; the reference is the same base with the adapter switched
off (`reference_mode`, no second copy, as OpenRLHF and TRL + PEFT do); a version is published as its adapter, whose
manifest names the digest of the base it was trained on, so a follower refuses an adapter meant for another base.

    from training.lora import LoRAConfig, add_adapter
    policy = add_adapter(model, LoRAConfig(rank=16))       # only the adapter's parameters train
    with reference_mode(policy): ref_logits = policy(ids).logits
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from training.model import CONSTRUCTION

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft's save_pretrained writes
BASE_FILE = "base.json"  # beside the adapter: the base's folder (as the registry names it) and digest


@dataclass
class LoRAConfig:
    rank: int = 16  # r: 8-64 is the usual range for RLHF/DPO on 100 M-8 B models (OpenRLHF --lora_rank 16-64)
    alpha: int = 32  # scale alpha/r = 2: the update's size stays comparable when the rank changes
    dropout: float = 0.0  # RL and preference updates are small and few; dropout only adds noise to the ratio terms
    target_modules: list[str] | str = field(default="all-linear")  # every linear layer but the output head (QLoRA)
    seed: int = 0  # the adapter's A matrices start random: seeded, a run is reproducible whatever ran before

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout}")

    def peft(self, task_type: str = "CAUSAL_LM") -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            task_type=task_type,
        )


def add_adapter(model: PreTrainedModel, cfg: LoRAConfig, task_type: str = "CAUSAL_LM") -> PeftModel:
    """Freeze `model` and wrap it with a fresh LoRA adapter (B = 0, so the wrapped model starts equal to the base).
    `task_type="SEQ_CLS"` (a reward model) also trains and saves the whole score head."""
    with CONSTRUCTION, torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's stream
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, cfg.peft(task_type))


def is_adapted(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel)


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module) -> Iterator[None]:
    """The reference policy of a LoRA policy: the same module with its adapter switched off — exactly the base's
    outputs, with no second copy of the weights in memory."""
    if not is_adapted(model):
        raise TypeError("reference_mode needs a LoRA-adapted model (training.lora.add_adapter)")
    with model.disable_adapter():
        yield


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_count(path: str | Path) -> int:
    """Parameters of a model folder, from its safetensors headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                total += math.prod(st.get_slice(key).get_shape())
    return total


def folder_digest(path: str | Path) -> str:
    """A digest that names a model folder's weights: the sha256 of its alignd manifest's file list when it has one
    (already hashed at publish), else of its weight files. Adapters record it to refuse a mismatched base."""
    path = Path(path)
    manifest = path / "manifest.json"
    h = hashlib.sha256()
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files") or {}
        weights = {k: v for k, v in files.items() if k.endswith((".safetensors", ".bin", "config.json"))}
        h.update(json.dumps(weights, sort_keys=True).encode())
        return h.hexdigest()
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + [path / "config.json"]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def save_adapter(model: PeftModel, dest: str | Path, *, base: str, base_digest: str) -> None:
    """Write the adapter (peft's safetensors + config) and `base.json` naming the base it belongs to."""
    dest = Path(dest)
    model.save_pretrained(str(dest))
    (dest / BASE_FILE).write_text(json.dumps({"base": base, "digest": base_digest}, indent=2))


def adapter_base(path: str | Path) -> dict[str, str] | None:
    """{"base", "digest"} of an adapter folder, or None when the folder is a full model."""
    f = Path(path) / BASE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class BaseMismatch(Exception):
    """An adapter was trained on another base than the one offered."""


def check_base(adapter_dir: str | Path, base_dir: str | Path) -> None:
    want = (adapter_base(adapter_dir) or {}).get("digest")
    have = folder_digest(base_dir)
    if want != have:
        raise BaseMismatch(
            f"{adapter_dir}: adapter was trained on a base with digest {str(want)[:12]}…, {base_dir} has {have[:12]}…"
        )


def apply_adapter(
    base: PreTrainedModel, adapter_dir: str | Path, base_dir: str | Path, *, merge: bool
) -> PreTrainedModel:
    """The base with the adapter at `adapter_dir` applied: merged into the weights (`merge=True`: plain HF model,
    decoding speed of the base) or kept as a PeftModel. Refuses an adapter whose recorded base digest differs."""
    check_base(adapter_dir, base_dir)
    with CONSTRUCTION:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model.merge_and_unload() if merge else model


# adapter_config.json fields that change what a LoRA layer computes beyond W + scale * B @ A: an adapter using any of
# them is merged by peft itself (`merged_copy` returns None)
_PLAIN_LORA_OFF = (
    "use_dora",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "layer_replication",
    "use_bdlora",
    "use_qalora",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def _plain_lora_pairs(adapter_dir: Path) -> tuple[dict[str, dict[str, torch.Tensor]], float, bool] | None:
    """({module: {"A", "B"}}, scale, fan_in_fan_out) of a plain LoRA adapter folder, else None."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / ADAPTER_FILES[0]).read_text())
    if cfg.get("peft_type") != "LORA" or any(cfg.get(k) for k in _PLAIN_LORA_OFF):
        return None
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r  # peft's LoraLayer.update_layer
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(adapter_dir / ADAPTER_FILES[1])).items():
        m = _KEY.match(key)
        if m is None:  # embedding adapters, biases, saved modules: not the plain linear case
            return None
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if any(set(ab) != {"A", "B"} or ab["A"].shape[0] != r for ab in pairs.values()):
        return None
    return pairs, scale, bool(cfg.get("fan_in_fan_out"))


@torch.no_grad()
def merged_copy(
    base: PreTrainedModel, adapter_dir: str | Path, spare: dict[str, torch.Tensor] | None = None
) -> PreTrainedModel | None:
    """A model equal to `base` with the adapter at `adapter_dir` merged in, built without peft: each adapted weight
    is one `addmm` (W + scale * B @ A, written straight into a new tensor), every other parameter and buffer is
    *shared* with `base` (nothing else is copied). So `base` and the result must never be written to — the server
    never changes a served model's weights. What the 538 MB deepcopy + peft load + merge_and_unload cost (1 s at the
    135 M shape on 2 cores, bench/cycle.py) becomes the adapted weights' one pass. None when the adapter is not plain
    LoRA on linear layers (DoRA, saved modules, rank patterns …) or does not fit `base`: use peft then.

    `spare` ({weight name: tensor}, e.g. `BaseCache`'s) supplies already-touched memory for the merged weights: the
    same addmm into fresh memory costs 2-8x more at that shape (the kernel's page faults on ~400 MB)."""
    plan = _plain_lora_pairs(Path(adapter_dir))
    if plan is None:
        return None
    pairs, scale, fan_in_fan_out = plan
    params = dict(base.named_parameters())
    memo: dict[int, object] = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    for module, ab in pairs.items():
        w = params.get(f"{module}.weight")
        if w is None or w.dim() != 2:
            return None
        a, b = (ab[k].to(device=w.device, dtype=w.dtype) for k in "AB")
        # (out, in) += (out, r) @ (r, in); a Conv1D weight (GPT-2) is (in, out): add the transpose, A^T B^T
        lhs, rhs = (a.T, b.T) if fan_in_fan_out else (b, a)
        if (lhs.shape[0], rhs.shape[1]) != tuple(w.shape):
            return None
        out = (spare or {}).get(f"{module}.weight")
        if out is None or out.shape != w.shape or out.dtype != w.dtype or out.device != w.device:
            out = torch.empty_like(w)
        memo[id(w)] = torch.nn.Parameter(torch.addmm(w, lhs, rhs, alpha=scale, out=out), requires_grad=False)
    model = copy.deepcopy(base, memo)  # the modules' structure is copied; tensors come from `memo`
    return model.eval()


def linear_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """{name: weight} of every linear layer (Conv1D in GPT-2) but the output head: what target "all-linear" adapts."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return {
        f"{name}.weight": module.weight
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head
    }


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A copy of the adapter's weights alone (a few MB): what a halfway snapshot or a parent needs to keep."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    set_peft_model_state_dict(model, state)


class ReferenceView(torch.nn.Module):
    """The base of a LoRA model as a model of its own (forward and generate with the adapter off), for code that
    takes a reference model as an argument (training/evaluate.py). Shares every weight with the adapted model."""

    def __init__(self, model: PeftModel):
        super().__init__()
        self.adapted = model

    @property
    def device(self) -> torch.device:
        return next(self.adapted.parameters()).device

    def forward(self, *args, **kwargs):
        with reference_mode(self.adapted):
            return self.adapted(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with reference_mode(self.adapted):
            return self.adapted.generate(*args, **kwargs)


class BaseCache:
    """The base the last adapter was applied to, verified (sha256 manifest) and loaded once per process. A later
    adapter version on the same base is then merged into it (`merged_copy`: the adapted weights written into spare
    memory prepared in the background, every other tensor shared) — no disk read, no hash of the base and no full
    copy — which is what makes an adapter swap fast (bench/cycle.py). A full version being served is
    offered as a base (`offer`), so even the first adapter on it needs no disk read. Keeps the last base (or the last
    full version served) alive: one model's memory."""

    def __init__(self) -> None:
        self._key: tuple[str, str, str] | None = None
        self._model = self._tokenizer = None
        self._spare: dict[str, torch.Tensor] | None = None  # touched memory for the next merge (`merged_copy`)
        self._filling = False
        self._lock = threading.Lock()

    def offer(self, base_dir: Path, model, tokenizer, device: str) -> None:
        """A verified full model loaded from `base_dir` (not copied: `get` copies, and the server never changes a
        served model's weights). Starts preparing the first adapter's spare memory in the background."""
        with self._lock:
            self._key = (str(base_dir), folder_digest(base_dir), device)
            self._model, self._tokenizer, self._spare = model, tokenizer, None
        self.refill_spare()

    def clear(self) -> None:
        with self._lock:
            self._key = self._model = self._tokenizer = self._spare = None

    def spare_ready(self) -> bool:
        return self._spare is not None

    def take_spare(self) -> dict[str, torch.Tensor] | None:
        with self._lock:
            spare, self._spare = self._spare, None
            return spare

    def refill_spare(self) -> None:
        """In a background thread, allocate and touch memory for the next adapter's merged weights (every weight of
        the base's linear layers but the output head: what "all-linear" adapts), so the swap itself does not pay
        the page faults. CPU only: a CUDA caching allocator has no such cost. Costs one copy of those weights."""
        with self._lock:
            key, model = self._key, self._model
            if model is None or self._spare is not None or self._filling or not str(key[2]).startswith("cpu"):
                return
            self._filling = True
        threading.Thread(target=self._fill_spare, args=(key, model), name="alignd-spare", daemon=True).start()

    def _fill_spare(self, key: tuple[str, str, str], model) -> None:
        try:
            spare = {name: torch.zeros_like(w) for name, w in linear_weights(model).items()}
        finally:
            with self._lock:
                self._filling = False
        with self._lock:
            if self._key == key:
                self._spare = spare

    def get(self, base_dir: Path, device: str, *, copy_model: bool = True):
        """(model, tokenizer) of the base: a deep copy (a caller may wrap and change it), or with `copy_model` off
        the cached model itself, which the caller must not write to (`merged_copy` shares its tensors)."""
        from training.checkpoint import MANIFEST, verify_checkpoint
        from training.model import load_causal_lm

        key = (str(base_dir), folder_digest(base_dir), device)
        with self._lock:
            if key != self._key:
                if (base_dir / MANIFEST).is_file():
                    verify_checkpoint(base_dir)
                self._model, self._tokenizer = load_causal_lm(base_dir, device)
                self._key = key
            return (copy.deepcopy(self._model) if copy_model else self._model), self._tokenizer


def base_folder(adapter_dir: str | Path, resolve_base=None) -> Path:
    """The base folder an adapter names: `resolve_base(recorded)` (the registry's path rule), by default a relative
    base is a sibling folder, as versions sit side by side under the checkpoint root."""
    recorded = Path(adapter_base(adapter_dir)["base"])
    if resolve_base is not None:
        return Path(resolve_base(str(recorded)))
    return recorded if recorded.is_absolute() else Path(adapter_dir).parent / recorded


def load_policy(
    path: str | Path,
    device: str = "cpu",
    *,
    resolve_base=None,
    trainable: bool = False,
    merge: bool = True,
    base_cache: BaseCache | None = None,
):
    """(model, tokenizer) of a policy folder, full or adapter. An adapter folder is applied to its base, found with
    `resolve_base(recorded base)` (the registry's path rule; by default a relative base is a sibling folder, as
    versions sit side by side under the checkpoint root) and checked against the recorded digest; the base's
    tokenizer is the adapter's. `trainable` keeps the adapter as a trainable PeftModel (a cycle continuing it);
    otherwise `merge` folds it into the base weights (serving at the base's speed). `base_cache` keeps the base in
    memory between adapter versions (the API's follower)."""
    from training.model import load_causal_lm

    if adapter_base(path) is None:
        return load_causal_lm(path, device)
    base_dir = base_folder(path, resolve_base)
    if trainable or not merge:
        base, tokenizer = base_cache.get(base_dir, device) if base_cache else load_causal_lm(base_dir, device)
        check_base(path, base_dir)
        with CONSTRUCTION:
            model = PeftModel.from_pretrained(base, str(path), is_trainable=trainable)
        return (model if trainable else model.eval()), tokenizer
    # serving: the cached base itself (not copied), the adapter folded into new copies of the weights it touches
    if base_cache is not None:
        base, tokenizer = base_cache.get(base_dir, device, copy_model=False)
    else:
        base, tokenizer = load_causal_lm(base_dir, device)
    check_base(path, base_dir)
    merged = merged_copy(base, path, base_cache.take_spare() if base_cache else None)
    if merged is not None:
        return merged, tokenizer
    base = copy.deepcopy(base) if base_cache else base  # peft wraps and changes the model it is given
    with CONSTRUCTION:
        return PeftModel.from_pretrained(base, str(path)).eval().merge_and_unload(), tokenizer
