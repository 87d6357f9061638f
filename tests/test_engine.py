"""Trainer pieces: parameter groups, gradient clipping, schedules, evaluator choice, CPU DDP,
mixed precision on the CPU."""
import logging

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils.events import EventStorage
from torch import nn

import kmax_m2f
from kmax_m2f.engine import Trainer, build_optimizer, build_param_groups, create_ddp_model
from kmax_m2f.engine import trainer as trainer_module
from kmax_m2f.engine.trainer import CPUAutocast, build_train_loop
from kmax_m2f.evaluation import build_evaluator


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 2)
        self.norm = nn.LayerNorm(4)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(3))


def _group_of(groups, param):
    return next(g for g in groups if any(p is param for p in g["params"]))


def test_param_groups_apply_multiplier_and_decay_rules():
    model = ToyModel()
    groups = build_param_groups(
        model, base_lr=1.0, weight_decay=0.05, weight_decay_norm=0.0, weight_decay_embed=0.0,
        backbone_multiplier=0.1, no_decay_names=("relative_position_bias_table",),
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    conv, bn = model.backbone[0], model.backbone[1]
    assert _group_of(groups, conv.weight) == {"params": _group_of(groups, conv.weight)["params"], "lr": 0.1, "weight_decay": 0.05}
    assert (_group_of(groups, bn.weight)["lr"], _group_of(groups, bn.weight)["weight_decay"]) == (0.1, 0.0)
    assert (_group_of(groups, model.head.weight)["lr"], _group_of(groups, model.head.weight)["weight_decay"]) == (1.0, 0.05)
    assert _group_of(groups, model.query_embed.weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.norm.weight)["weight_decay"] == 0.0
    assert _group_of(groups, model.relative_position_bias_table)["weight_decay"] == 0.0


def _solver_cfg(**overrides):
    cfg = kmax_m2f.build_config()
    cfg.SOLVER.BASE_LR = 1.0
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    cfg.SOLVER.OPTIMIZER = "SGD"
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def test_full_model_gradient_clipping_bounds_the_total_norm():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    cfg = _solver_cfg(**{"SOLVER.CLIP_GRADIENTS.ENABLED": True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.01})
    optimizer = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    # SGD with lr 1 and no momentum: the update is minus the clipped gradient of all parameters.
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert update.norm().item() == pytest.approx(0.01, rel=1e-4)
    assert torch.allclose(update, update[0].expand_as(update)), "clipping rescales, it does not reshape"


@pytest.mark.parametrize("name", ["SGD", "ADAMW"])
def test_cpu_optimizers_take_the_fused_step_with_the_same_update(name):
    torch.manual_seed(0)
    model = ToyModel()
    cfg = _solver_cfg(**{"SOLVER.OPTIMIZER": name, "SOLVER.BASE_LR": 0.01, "SOLVER.MOMENTUM": 0.9})
    optimizer = build_optimizer(cfg, model)
    assert optimizer.defaults["fused"] is True
    reference_model = ToyModel()
    reference_model.load_state_dict(model.state_dict())
    reference_optimizer = build_optimizer(cfg, reference_model)
    for group in reference_optimizer.param_groups:
        group["fused"] = None  # PyTorch's default CPU step: one parameter at a time
    for _ in range(3):
        for param, reference_param in zip(model.parameters(), reference_model.parameters()):
            param.grad = torch.randn_like(param)
            reference_param.grad = param.grad.clone()
        optimizer.step()
        reference_optimizer.step()
    for param, reference_param in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(param, reference_param)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER='LAMB'"):
        build_optimizer(_solver_cfg(**{"SOLVER.OPTIMIZER": "LAMB"}), nn.Linear(2, 2))


def test_adamw_optimizer_type():
    optimizer = build_optimizer(_solver_cfg(**{"SOLVER.OPTIMIZER": "ADAMW"}), nn.Linear(2, 2))
    assert isinstance(optimizer, torch.optim.AdamW)


def test_poly_schedule_with_warmup_follows_the_formula():
    cfg = _solver_cfg(**{"SOLVER.LR_SCHEDULER_NAME": "WarmupPolyLR", "SOLVER.MAX_ITER": 100,
                         "SOLVER.WARMUP_ITERS": 10, "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.WARMUP_METHOD": "linear"})
    optimizer = build_optimizer(cfg, nn.Linear(2, 2))
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx((0.1 + 0.9 * 0.5) * (1 - 5 / 100) ** 0.9)
    assert lrs[50] == pytest.approx((1 - 50 / 100) ** 0.9)


def _lrs(cfg, steps):
    optimizer = build_optimizer(cfg, nn.Linear(2, 2))
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_tf2_warmup_poly_schedule_follows_deeplab2():
    """kMaX's TF2WarmupPolyLR: warmup factor alone during warmup, then the poly of the whole run
    (not multiplied together as in detectron2's WarmupPolyLR), held at the constant ending."""
    cfg = _solver_cfg(**{"SOLVER.LR_SCHEDULER_NAME": "TF2WarmupPolyLR", "SOLVER.MAX_ITER": 100,
                         "SOLVER.WARMUP_ITERS": 10, "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.WARMUP_METHOD": "linear"})
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[10] == pytest.approx((1 - 10 / 100) ** 0.9)
    assert lrs[50] == pytest.approx((1 - 50 / 100) ** 0.9)
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.3
    lrs = _lrs(cfg, 100)
    assert lrs[50] == pytest.approx((1 - 50 / 100) ** 0.9)
    assert lrs[95] == pytest.approx(0.3)


def test_warmup_then_poly_schedule_follows_restr():
    """ReSTR's schedule: lr x it / warmup from 0, then (1 - (it - warmup) / (max - warmup)) ** 0.9."""
    cfg = _solver_cfg(**{"SOLVER.LR_SCHEDULER_NAME": "WarmupThenPolyLR", "SOLVER.MAX_ITER": 100,
                         "SOLVER.WARMUP_ITERS": 10, "SOLVER.WARMUP_FACTOR": 0.0, "SOLVER.POLY_LR_POWER": 0.9})
    lrs = _lrs(cfg, 100)
    assert lrs[0] == pytest.approx(0.0)
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx((1 - 45 / 90) ** 0.9)
    assert lrs[99] == pytest.approx((1 - 89 / 90) ** 0.9)


def test_models_name_their_backbone_modules_for_the_lr_multiplier():
    model = ToyModel()
    model.encoder_v = model.backbone
    del model.backbone
    model.backbone_module_names = ("encoder_v",)
    groups = build_param_groups(model, base_lr=1.0, weight_decay=0.0, weight_decay_norm=0.0, weight_decay_embed=0.0,
                                backbone_multiplier=0.1)
    assert _group_of(groups, model.encoder_v[0].weight)["lr"] == 0.1
    assert _group_of(groups, model.head.weight)["lr"] == 1.0


def test_multistep_schedule():
    cfg = _solver_cfg(**{"SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.MAX_ITER": 30,
                         "SOLVER.STEPS": (10, 20), "SOLVER.GAMMA": 0.1, "SOLVER.WARMUP_ITERS": 0})
    optimizer = build_optimizer(cfg, nn.Linear(2, 2))
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(30):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert (lrs[9], lrs[10], lrs[25]) == pytest.approx((1.0, 0.1, 0.01))


def test_ddp_wrapper_is_identity_in_a_single_process():
    model = nn.Linear(2, 2)
    assert create_ddp_model(model) is model


class LossModel(nn.Module):
    """Returns its conv output's dtype as the loss's dtype, to show the autocast state."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, batch):
        output = self.conv(batch)
        return {"loss": output.float().square().mean()} if self.training else output


def test_amp_on_cpu_trains_under_bfloat16_autocast_and_infers_in_float32(monkeypatch):
    # Functionally the same where oneDNN emulates bfloat16; only slower.
    monkeypatch.setattr(trainer_module, "cpu_runs_bfloat16_natively", lambda: True)
    cfg = kmax_m2f.build_config()
    model = LossModel()
    batches = iter([torch.randn(2, 3, 8, 8)] * 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert type(build_train_loop(cfg, model, batches, optimizer).model) is LossModel
    cfg.SOLVER.AMP.ENABLED = True
    loop = build_train_loop(cfg, model, batches, optimizer)
    assert isinstance(loop.model, CPUAutocast) and loop.model.module is model
    seen = []
    model.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    before = model.conv.weight.detach().clone()
    loop.iter = 0
    with EventStorage():
        loop.run_step()
    assert seen == [torch.bfloat16]
    assert model.conv.weight.dtype == torch.float32 and not torch.equal(model.conv.weight, before)
    loop.model.eval()
    assert loop.model(torch.randn(1, 3, 8, 8)).dtype == torch.float32


def test_amp_on_a_cpu_without_native_bfloat16_trains_in_float32_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(trainer_module, "cpu_runs_bfloat16_natively", lambda: False)
    cfg = kmax_m2f.build_config()
    cfg.SOLVER.AMP.ENABLED = True
    model = LossModel()
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        loop = build_train_loop(cfg, model, iter([]), torch.optim.SGD(model.parameters(), lr=0.1))
    assert loop.model is model
    assert "no native bfloat16" in caplog.text


def test_evaluator_follows_dataset_type_and_task_flags(synthetic_prefix, tmp_path):
    cfg = kmax_m2f.build_config()
    sem = build_evaluator(cfg, f"{synthetic_prefix}_sem_seg_val", str(tmp_path))
    assert isinstance(sem, SemSegEvaluator)
    assert isinstance(build_evaluator(cfg, f"{synthetic_prefix}_instance_val", str(tmp_path)), COCOEvaluator)

    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    both = build_evaluator(cfg, f"{synthetic_prefix}_panoptic_val", str(tmp_path))
    assert isinstance(both, DatasetEvaluators)
    assert [type(e) for e in both._evaluators] == [COCOPanopticEvaluator, COCOEvaluator]


def test_evaluator_for_unknown_type_names_the_fix():
    MetadataCatalog.get("pytest_no_eval_type").set(evaluator_type="lvis_magic")
    with pytest.raises(ValueError, match="evaluator_type='lvis_magic'.*when registering it"):
        build_evaluator(kmax_m2f.build_config(), "pytest_no_eval_type")


# --------------------------------------------------------------------------- kMaX's decay rule
def _official_kmax_decay(model: nn.Module, weight_decay: float, weight_decay_norm: float,
                         weight_decay_embed: float) -> dict[str, float]:
    """Weight decay per parameter as the official kMaX trainer (bytedance/kmax-deeplab
    train_net.py) assigns it, written out from its rules: norms WEIGHT_DECAY_NORM, embeddings
    WEIGHT_DECAY_EMBED, then 0 for "_rpe" / "_cluster_centers" in the module's name and "bias" /
    "gamma" in the parameter's."""
    decay = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            value = weight_decay
            if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                value = weight_decay_norm
            if isinstance(module, nn.Embedding):
                value = weight_decay_embed
            if "_rpe" in module_name or "_cluster_centers" in module_name or "bias" in param_name or "gamma" in param_name:
                value = 0.0
            decay[f"{module_name}.{param_name}"] = value
    return decay


def _decay_of(cfg) -> tuple[nn.Module, dict[str, float]]:
    from detectron2.modeling import build_model

    cfg.MODEL.DEVICE = "meta"
    with torch.device("meta"):
        model = build_model(cfg)
    solver = cfg.SOLVER
    groups = build_param_groups(model, solver.BASE_LR, solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM,
                                solver.WEIGHT_DECAY_EMBED, solver.BACKBONE_MULTIPLIER, tuple(solver.WEIGHT_DECAY_EXCLUDE))
    by_param = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    return model, {name: by_param[id(p)] for name, p in model.named_parameters()}


@pytest.mark.parametrize("backbone_overrides", [[], ["MODEL.BACKBONE.NAME", "D2ConvNeXt"]], ids=["R50", "ConvNeXt-L"])
def test_official_kmax_yamls_get_the_official_weight_decay(tmp_path, backbone_overrides):
    from .conftest import REPO
    from .test_kmax_backbones import OFFICIAL_COCO_R50

    official_yaml = tmp_path / "kmax_r50.yaml"
    official_yaml.write_text(OFFICIAL_COCO_R50)
    model, decay = _decay_of(kmax_m2f.build_config(str(official_yaml), backbone_overrides))
    official = _official_kmax_decay(model, 0.05, 0.0, 0.0)
    assert decay == official
    # What the rule is for: without it, an official YAML decayed these.
    assert sum(1 for name, value in official.items() if value == 0 and name.endswith(".bias")) > 15
    if backbone_overrides:
        assert any(name.endswith(".gamma") and value == 0 for name, value in decay.items())

    project_yaml = str(REPO / "configs/coco/panoptic-segmentation/kmax_r50.yaml")
    assert _decay_of(kmax_m2f.build_config(project_yaml, backbone_overrides))[1] == decay
