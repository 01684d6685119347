"""An empty batch (B = 0) is refused before anything is computed or any state is touched.

Every loss exported from fastkd (module and functional twin, on every backend available here) raises
``ValueError`` naming its first batched argument; a module's parameters and buffers (BatchNorm running
statistics, CRD's banks, Z and RNG state) are bit-identical after the refused call. The native and
Triton CRD ops refuse B = 0 themselves, and an empty bank update leaves the bank as it was.
"""
import copy

import pytest
import torch

import fastkd
from fastkd import functional as fk


def maps(b, c, h, seed=0):
    return torch.randn(b, c, h, h, generator=torch.Generator().manual_seed(seed))


def rows(b, d, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def frames(b, t, c, seed=0):
    return torch.randn(b, t, c, generator=torch.Generator().manual_seed(seed))


def labels(b, classes=10):
    return torch.zeros(b, dtype=torch.long) % classes


def crd_inputs(b):
    return rows(b, 12), rows(b, 10, seed=1), torch.arange(b), None


def crd_functional(b):
    v = fk.l2_normalize(rows(b, 8))
    bank = fk.l2_normalize(rows(30, 8, seed=2))
    return fk.crd_loss(v, v, bank, bank, torch.zeros(b, 5, dtype=torch.long))


# name → (module factory, inputs for a batch of b, the argument named in the error, the functional twin or None)
CASES = {
    "KDLoss": (fastkd.KDLoss, lambda b: (rows(b, 10), rows(b, 10, 1)), "logits_s",
               lambda b: fk.kd_loss(rows(b, 10), rows(b, 10, 1))),
    "DKDLoss": (fastkd.DKDLoss, lambda b: (rows(b, 10), rows(b, 10, 1), labels(b)), "logits_s",
                lambda b: fk.dkd_loss(rows(b, 10), rows(b, 10, 1), labels(b))),
    "HardDistillationLoss": (fastkd.HardDistillationLoss, lambda b: (rows(b, 10), rows(b, 10, 1)), "logits_s",
                             lambda b: fk.hard_distillation_loss(rows(b, 10), rows(b, 10, 1))),
    "HintLoss": (fastkd.HintLoss, lambda b: (maps(b, 4, 3), maps(b, 4, 3, 1)), "f_s",
                 lambda b: fk.hint_loss(maps(b, 4, 3), maps(b, 4, 3, 1))),
    "ConvReg": (lambda: fastkd.ConvReg((1, 3, 8, 8), (1, 4, 4, 4)), lambda b: (maps(b, 3, 8),), "f_s", None),
    "Connector": (lambda: fastkd.Connector([(1, 3, 8, 8)], [(1, 4, 4, 4)]), lambda b: ([maps(b, 3, 8)],), "f_s",
                  None),
    "ATLoss": (fastkd.ATLoss, lambda b: (maps(b, 3, 4), maps(b, 5, 2, 1)), "f_s",
               lambda b: fk.at_loss(maps(b, 3, 4), maps(b, 5, 2, 1))),
    "NSTLoss": (fastkd.NSTLoss, lambda b: (maps(b, 3, 4), maps(b, 5, 2, 1)), "f_s",
                lambda b: fk.nst_loss(maps(b, 3, 4), maps(b, 5, 2, 1))),
    "FTLoss": (fastkd.FTLoss, lambda b: (maps(b, 3, 4), maps(b, 2, 4, 1)), "factor_s",
               lambda b: fk.ft_loss(maps(b, 3, 4), maps(b, 2, 4, 1))),
    "Paraphraser": (lambda: fastkd.Paraphraser((1, 4, 4, 4), use_bn=True), lambda b: (maps(b, 4, 4),), "f", None),
    "Translator": (lambda: fastkd.Translator((1, 3, 4, 4), (1, 4, 4, 4)), lambda b: (maps(b, 3, 4),), "f_s", None),
    "ABLoss": (fastkd.ABLoss, lambda b: (maps(b, 3, 4), maps(b, 3, 4, 1)), "g_s",
               lambda b: fk.ab_loss(maps(b, 3, 4), maps(b, 3, 4, 1))),
    "FSPLoss": (fastkd.FSPLoss, lambda b: ([maps(b, 3, 4), maps(b, 3, 2)], [maps(b, 3, 4, 1), maps(b, 3, 2, 1)]),
                "g_s\\[0\\]", lambda b: fk.fsp_loss([maps(b, 3, 4), maps(b, 3, 2)], [maps(b, 3, 4, 1), maps(b, 3, 2, 1)])),
    "VIDLoss": (lambda: fastkd.VIDLoss(3, 4, 5), lambda b: (maps(b, 3, 4), maps(b, 5, 4, 1)), "input",
                lambda b: fk.vid_loss(maps(b, 5, 4), maps(b, 5, 4, 1), torch.zeros(5))),
    "SPLoss": (fastkd.SPLoss, lambda b: (maps(b, 3, 4), maps(b, 5, 2, 1)), "f_s",
               lambda b: fk.sp_loss(maps(b, 3, 4), maps(b, 5, 2, 1))),
    "IUSPLoss": (fastkd.IUSPLoss, lambda b: (frames(b, 5, 3), frames(b, 5, 4, 1)), "f_s",
                 lambda b: fk.iusp_loss(frames(b, 5, 3), frames(b, 5, 4, 1))),
    "CCLoss": (fastkd.CCLoss, lambda b: (rows(b, 6), rows(b, 6, 1)), "e_s",
               lambda b: fk.cc_loss(rows(b, 6), rows(b, 6, 1))),
    "CCLoss(embeds)": (lambda: fastkd.CCLoss(6, 7, feat_dim=4), lambda b: (rows(b, 6), rows(b, 7, 1)), "e_s", None),
    "CCKDLoss": (fastkd.CCKDLoss, lambda b: (rows(b, 6), rows(b, 7, 1)), "e_s",
                 lambda b: fk.cckd_loss(rows(b, 6), rows(b, 7, 1))),
    "CCKDLoss(embeds)": (lambda: fastkd.CCKDLoss(s_dim=6, t_dim=7, feat_dim=4), lambda b: (rows(b, 6), rows(b, 7, 1)),
                         "e_s", None),
    "RKDLoss": (fastkd.RKDLoss, lambda b: (rows(b, 6), rows(b, 7, 1)), "f_s",
                lambda b: fk.rkd_loss(rows(b, 6), rows(b, 7, 1))),
    "PKTLoss": (fastkd.PKTLoss, lambda b: (rows(b, 6), rows(b, 7, 1)), "f_s",
                lambda b: fk.pkt_loss(rows(b, 6), rows(b, 7, 1))),
    "SRDLoss": (lambda: fastkd.SRDLoss(6, 7), lambda b: (rows(b, 6), rows(b, 7, 1)), "f_s",
                lambda b: fk.srd_loss(rows(b, 7), rows(b, 7, 1))),
    "CRDLoss": (lambda: fastkd.CRDLoss(12, 10, 30, feat_dim=8, num_negatives=4, seed=3), crd_inputs, "f_s",
                crd_functional),
    "EnsembleCRDLoss": (lambda: fastkd.EnsembleCRDLoss(12, [10, 7], 30, feat_dim=8, num_negatives=4, seed=3),
                        lambda b: (rows(b, 12), [rows(b, 10, seed=1), rows(b, 7, seed=2)], torch.arange(b), None),
                        "f_s", None),
    "OnlineKDLoss": (fastkd.OnlineKDLoss, lambda b: (torch.randn(3, b, 5), rows(b, 5)), "branch_logits",
                     lambda b: fk.online_kd_loss(torch.randn(3, b, 5), rows(b, 5))),
    "branch_cross_entropy": (None, None, "branch_logits",
                             lambda b: fk.branch_cross_entropy(torch.randn(3, b, 5), labels(b, 5), rows(b, 5))),
    "OKDDipLoss": (lambda: fastkd.OKDDipLoss(6), lambda b: (torch.randn(3, b, 5), torch.randn(3, b, 6)),
                   "branch_logits", lambda b: fk.okddip_loss(torch.randn(2, b, 5), rows(b, 5), torch.ones(b, 2, 2) / 2)),
    "RotationContrastLoss": (lambda: fastkd.RotationContrastLoss(6), lambda b: (rows(4 * b, 6),), "features",
                             lambda b: fk.rotation_contrast_loss(rows(4 * b, 6))),
    "SSKDLoss": (lambda: fastkd.SSKDLoss(6, 7), lambda b: (rows(4 * b, 6), rows(4 * b, 7, 1)), "features_s",
                 lambda b: fk.sskd_similarity_loss(rows(4 * b, 6), rows(4 * b, 7, 1))),
    "RotationKDLoss": (fastkd.RotationKDLoss, lambda b: (rows(4 * b, 5), rows(4 * b, 5, 1), labels(b, 5)), "logits_s",
                       lambda b: fk.rotation_kd_loss(rows(4 * b, 5), rows(4 * b, 5, 1), labels(b, 5))),
    "STKDLoss": (fastkd.STKDLoss, lambda b: (rows(b, 5), rows(b, 5, 1), labels(b, 5), labels(b, 5), 0.3), "logits_s",
                 lambda b: fk.stkd_loss(rows(b, 5), rows(b, 5, 1), labels(b, 5), labels(b, 5), 0.3)),
}
# where the functional twin names its first argument differently from the module
FUNCTIONAL_ARG = {"SRDLoss": "z_s", "VIDLoss": "pred_mean", "CRDLoss": "v_s", "OKDDipLoss": "peer_logits",
                  "RotationContrastLoss": "embeddings", "SSKDLoss": "embeddings_s"}
ADAPTERS = {"ConvReg", "Connector", "Paraphraser", "Translator"}  # they return maps, not a loss
MODULES = [name for name, case in CASES.items() if case[0] is not None]
FUNCTIONS = [name for name, case in CASES.items() if case[3] is not None]
# Exported modules that take no batch: SSKDHead is a plain nn.Sequential (an adapter without checks,
# like nn.Linear), ClassifierDiversityLoss takes the classifiers' weight matrices.
NOT_BATCHED = {"SSKDHead", "ClassifierDiversityLoss"}


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict(keep_vars=True).items()}


def assert_unchanged(module, before):
    after = module.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


def test_every_exported_module_is_covered():
    exported = {name for name in fastkd.__all__ if isinstance(getattr(fastkd, name), type)
                and issubclass(getattr(fastkd, name), torch.nn.Module)}
    covered = {name.split("(")[0] for name in MODULES}
    assert exported - NOT_BATCHED == covered


@pytest.mark.parametrize("backend", fastkd.backends())
@pytest.mark.parametrize("name", MODULES)
def test_module_refuses_an_empty_batch_and_keeps_its_state(name, backend):
    make, inputs, arg, _ = CASES[name]
    torch.manual_seed(0)
    module = make()
    module(*inputs(4))  # a real step first: the state is no longer the initial one
    if name == "CRDLoss":
        assert module.z_s > 0 and module.rng_state[1] == 1
    before = snapshot(module)
    with fastkd.use_backend(backend), pytest.raises(ValueError, match=rf"^{arg} has batch size 0"):
        module(*inputs(0))
    assert_unchanged(module, before)
    with fastkd.use_backend(backend):
        out = module(*inputs(2))  # and the module still works
    assert name in ADAPTERS or torch.isfinite(out)


@pytest.mark.parametrize("backend", fastkd.backends())
@pytest.mark.parametrize("name", FUNCTIONS)
def test_functional_refuses_an_empty_batch(name, backend):
    _, _, arg, function = CASES[name]
    arg = FUNCTIONAL_ARG.get(name, arg)
    with fastkd.use_backend(backend), pytest.raises(ValueError, match=rf"^{arg} has batch size 0"):
        function(0)
    with fastkd.use_backend(backend):
        assert torch.isfinite(function(4)).all()


def test_the_value_checks_being_off_does_not_let_an_empty_batch_through():
    loss_fn = fastkd.CRDLoss(12, 10, 30, feat_dim=8, num_negatives=4, seed=3)
    before = snapshot(loss_fn)
    with fastkd.value_checks(False), pytest.raises(ValueError, match="^f_s has batch size 0"):
        loss_fn(*crd_inputs(0))
    assert_unchanged(loss_fn, before)


def crd_op_args(b, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(30, 8, generator=gen), dim=1).to(device)
    v = torch.nn.functional.normalize(torch.randn(b, 8, generator=gen), dim=1).to(device)
    return [v, v.clone(), bank, bank.clone(), torch.arange(b, device=device), None,
            torch.tensor(float("-inf"), device=device), torch.tensor(float("-inf"), device=device),
            torch.tensor([5, 0], dtype=torch.int64, device=device), 4, 0.07, 0.0, False]


@pytest.mark.native
def test_native_crd_op_refuses_an_empty_batch_itself():
    args = crd_op_args(0)
    banks = args[2].clone(), args[3].clone()
    with fastkd.value_checks(False), pytest.raises(RuntimeError, match="crd_nce: v_s has 0 rows"):
        torch.ops.fastkd.crd_nce(*args)
    args[5] = torch.zeros(0, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="crd_nce: v_s has 0 rows"):
        torch.ops.fastkd.crd_nce(*args)
    assert torch.equal(args[2], banks[0]) and torch.equal(args[3], banks[1])


def test_reference_crd_op_refuses_an_empty_batch():
    from fastkd.ops import crd

    with pytest.raises(ValueError, match="crd_nce: v_s has 0 rows"):
        crd.nce_with_grad_reference(*crd_op_args(0))
    with pytest.raises(ValueError, match="crd_nce: v_s has 0 rows"):
        crd.nce_reference(*crd_op_args(0)[:4], torch.zeros(0, 5, dtype=torch.long), *crd_op_args(0)[6:8], 0.07, 30)


def test_triton_crd_launcher_refuses_an_empty_batch():
    pytest.importorskip("triton")
    from fastkd.ops import crd_triton

    with pytest.raises(ValueError, match="crd_nce: v_s has 0 rows"):
        crd_triton.nce(*crd_op_args(0))


@pytest.mark.parametrize("backend", fastkd.backends())
def test_an_empty_bank_update_is_a_no_op(backend):
    bank = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    before = bank.clone()
    with fastkd.use_backend(backend):
        fk.crd_bank_update_(bank, torch.zeros(0, dtype=torch.long), torch.zeros(0, 8), 0.5)
    assert torch.equal(bank, before)
