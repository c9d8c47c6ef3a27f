"""The training-mitigation registry: one declaration per mitigation drives the config schema, the hooks, config
validation, the lab's arms and the docs table — and a new mitigation is one file (the worked example of
docs/extending.md, built here)."""

from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from conftest import ROOT

from guard_train.config.loader import all_keys
from guard_train.config.params import ranged
from guard_train.config.schema import Config
from guard_train.lab.bench import TRAIN_ARMS
from guard_train.training import mitigations
from guard_train.training.hooks import Hooks, StepContext
from guard_train.training.mitigations import REGISTRY, table
from guard_train.training.mitigations.base import Mitigation, register


# --- the worked example of docs/extending.md -------------------------------------------------------------------
@dataclass
class CaptionBlocklistConfig(Mitigation):
    section: ClassVar[str] = "caption_blocklist"
    summary: ClassVar[str] = "drop every sample whose caption is in a given list"
    arms: ClassVar[dict[str, dict[str, str]]] = {"blocklist": {"enabled": "true"}}
    enabled: bool = ranged(False, doc="turn it on")
    captions: list[str] = ranged(factory=list, doc="captions whose samples get weight 0")

    def build(self, hooks: Hooks, section_of) -> None:
        blocked = set(self.captions)
        hooks.loss_weighting.append(
            lambda ctx: torch.tensor([0.0 if c in blocked else 1.0 for c in ctx.captions]))
# ----------------------------------------------------------------------------------------------------------------


def _ctx(captions: list[str]) -> StepContext:
    b = len(captions)
    z = torch.zeros(b, 4, 2, 2)
    return StepContext(None, 0, torch.arange(b), captions, torch.zeros(b, dtype=torch.long), z, torch.zeros(b, 3, 8),
                       torch.ones(b), None)


def test_a_new_mitigation_is_one_declaration(monkeypatch):
    monkeypatch.setitem(REGISTRY, CaptionBlocklistConfig.section, CaptionBlocklistConfig)
    sections = {name: cls() for name, cls in REGISTRY.items()}
    sections["caption_blocklist"] = CaptionBlocklistConfig(enabled=True, captions=["a red circle"])
    cfg = SimpleNamespace(**sections)
    assert [m.section for m in mitigations.active(cfg)] == ["caption_blocklist"]
    h = mitigations.build_hooks(cfg)
    assert len(h.loss_weighting) == 1
    w = h.loss_weighting[0](_ctx(["a red circle", "a blue square"]))
    assert w.tolist() == [0.0, 1.0]
    assert "`mitigation.caption_blocklist.captions`" in table.markdown()


def test_register_refuses_a_duplicate_section():
    with pytest.raises(ValueError, match="already registered"):
        register(type("Again", (Mitigation,), {"section": "entropy_filter"}))


def test_schema_sections_and_keys_come_from_the_registry():
    mcfg = Config().mitigation
    assert [f.name for f in fields(mcfg)] == list(REGISTRY)
    keys = all_keys()
    for name, cls in REGISTRY.items():
        assert isinstance(getattr(mcfg, name), cls)
        assert {f"mitigation.{name}.{f.name}" for f in fields(cls)} <= set(keys)


def test_hooks_follow_the_registry_order():
    m = Config().mitigation
    m.entropy_filter.enabled = m.magnitude_filter.enabled = m.dup_sampling.enabled = True
    m.captions.mode, m.captions.gn_lambda = "rc", 0.1
    h = mitigations.build_hooks(m)
    assert [type(x).__name__ for x in h.loss_weighting] == ["EntropyFilter", "MagnitudeFilter"]
    assert len(h.caption_transforms) == 1 and len(h.embedding_transforms) == 1
    assert type(h.sampler_factory).__name__ == "DupAwareSamplerFactory"
    m.injection.enabled = True
    with pytest.raises(ValueError, match="dup_sampling and mitigation.injection both set the data order"):
        mitigations.check(m)


def test_lab_arms_are_the_registered_arms():
    want = {"plain": {}}
    for name, cls in REGISTRY.items():
        for arm, kv in cls.arms.items():
            want[arm] = {f"mitigation.{name}.{k}": v for k, v in kv.items()}
    assert {k: v for k, v in TRAIN_ARMS.items() if k != "entropy+dup (default)"} == want
    assert TRAIN_ARMS["entropy+dup (default)"] == {**want["entropy_filter"], **want["dup_sampling"]}


def test_docs_table_equals_the_declarations():
    text = (ROOT / "docs" / "mitigations.md").read_text()
    i, j = text.index(table.BEGIN), text.index(table.END) + len(table.END)
    assert text[i:j] == table.markdown(), "regenerate: guard-train mitigations --markdown"
