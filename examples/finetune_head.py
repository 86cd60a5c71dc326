"""Fine-tune only the head of an exported CNN over a frozen backbone, federated, with DP and SecAgg+.

1. The host has a small CNN (backbone: conv 1->8 3x3, ReLU, max-pool 2; head: linear 128->10),
   exported the way ``torch.onnx.export`` writes it (parameter names ``backbone.*`` and ``head.*``),
   and pretrains it on public data for another task: only the digits 0-4, 25% of the data.
2. The devices' task is all ten digits, so the host replaces the head by a freshly initialised one
   and compiles with ``trainable=["head."]`` (``fleetlearn compile --trainable head.``): the
   backbone becomes constants inside the graphs, only the 1290 head parameters train, and only
   they travel in the federated update, with distributed DP and SecAgg+ over the in-memory round
   layer (``examples/inprocess_fleet.py``).
3. It prints the accuracy before and after, the names in the federated update, and checks that
   the backbone weights inside the bundle are bit-for-bit the exported ones after training.

    python examples/finetune_head.py [--devices 30] [--rounds 8] [--epsilon 10] [--local-epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inprocess_fleet import FleetSettings, federated_train  # noqa: E402

from aggregator.compiler import compile_model  # noqa: E402
from edge_sdk.training import ModelSession, TrainConfig, TrainingState, evaluate, prepare_dataset, train_local  # noqa: E402


def cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """The CNN as torch exports ``nn.Sequential``s named backbone and head: input [batch, 1, 8, 8] -> 10 logits."""
    def uniform(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    params = {"backbone.0.weight": uniform((8, 1, 3, 3), 9), "backbone.0.bias": uniform((8,), 9),
              "head.weight": uniform((10, 128), 128), "head.bias": uniform((10,), 128)}
    nodes = [
        helper.make_node("Conv", ["input", "backbone.0.weight", "backbone.0.bias"], ["/backbone/0/Conv_output_0"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="/backbone/0/Conv"),
        helper.make_node("Relu", ["/backbone/0/Conv_output_0"], ["/backbone/1/Relu_output_0"], name="/backbone/1/Relu"),
        helper.make_node("MaxPool", ["/backbone/1/Relu_output_0"], ["/backbone/2/MaxPool_output_0"],
                         kernel_shape=[2, 2], strides=[2, 2], name="/backbone/2/MaxPool"),
        helper.make_node("Flatten", ["/backbone/2/MaxPool_output_0"], ["/Flatten_output_0"], axis=1, name="/Flatten"),
        helper.make_node("Gemm", ["/Flatten_output_0", "head.weight", "head.bias"], ["logits"], transB=1,
                         name="/head/Gemm"),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="example")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def with_params(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``params`` hold those values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in params:
            init.CopyFrom(numpy_helper.from_array(np.asarray(params[init.name], dtype=np.float32), init.name))
    return out


def bundle_backbone(bundle: Path) -> dict[str, np.ndarray]:
    """The backbone weights as the bundle's eval graph holds them (constants, possibly external data)."""
    model = onnx.load(str(bundle / "eval.onnx"), load_external_data=True)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.startswith("backbone.")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epsilon", type=float, default=10.0)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--local-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(digits.data))
    x = (digits.data[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target[order].astype(np.int64)
    public, private, test = np.split(np.arange(len(x)), [len(x) // 4, len(x) * 4 // 5])
    public = public[y[public] < 5]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exported = cnn(rng)
        compile_model(exported, tmp / "pretrain", loss="cross_entropy", optimizer="adam")
        pre = TrainingState(ModelSession.open(tmp / "pretrain", threads=1))
        train_local(pre, prepare_dataset(pre.session.manifest, x[public], y[public]),
                    TrainConfig(epochs=20, batch_size=16, lr=0.01, seed=args.seed))
        pretrained = pre.get_params()
        new_model = cnn(np.random.default_rng(args.seed + 1))
        fresh_head = {i.name: numpy_helper.to_array(i) for i in new_model.graph.initializer
                      if i.name.startswith("head.")}
        model = with_params(exported, {**{k: v for k, v in pretrained.items() if k.startswith("backbone.")},
                                       **fresh_head})
        onnx.save(model, str(tmp / "cnn.onnx"))
        exported_backbone = {k: v for k, v in pretrained.items() if k.startswith("backbone.")}

        bundle = tmp / "bundle"
        compile_model(tmp / "cnn.onnx", bundle, loss="cross_entropy", optimizer="sgd", trainable=["head."])
        session = ModelSession.open(bundle, threads=1)
        state = TrainingState(session)
        test_data = prepare_dataset(session.manifest, x[test], y[test])
        before = evaluate(state, test_data).accuracy
        names = sorted(state.get_params())
        print(f"pretrained on {len(public)} public digits 0-4; new head; trainable: {', '.join(names)} "
              f"({sum(v.size for v in state.get_params().values())} parameters); backbone frozen; test accuracy "
              f"before fine-tuning {before:.3f}")
        shards = np.array_split(rng.permutation(private), args.devices)
        data = {f"dev-{i:02d}": prepare_dataset(session.manifest, x[s], y[s]) for i, s in enumerate(shards)}

        def report(round_index: int, params: dict, epsilon: float) -> None:
            print(f"round {round_index:2d}: test accuracy {evaluate(state, test_data).accuracy:.3f}, "
                  f"fleet epsilon {epsilon:.2f}", flush=True)

        settings = FleetSettings(rounds=args.rounds, epsilon=args.epsilon, clip=args.clip, epochs=args.local_epochs,
                                 batch_size=16, lr=args.lr, seed=args.seed)
        result = federated_train(state, data, settings, report)
        after = evaluate(state, test_data).accuracy
        in_bundle = bundle_backbone(bundle)
        unchanged = in_bundle.keys() == exported_backbone.keys() and all(
            np.array_equal(in_bundle[k], exported_backbone[k]) for k in in_bundle)
        print(f"federated update carried only: {', '.join(sorted(result.params))}")
        print(f"RESULT before={before:.3f} after={after:.3f} backbone_unchanged={unchanged} "
              f"epsilon={result.epsilon:.2f}")
    return 0 if unchanged and after > before else 1


if __name__ == "__main__":
    sys.exit(main())
