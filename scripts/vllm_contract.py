"""Extract the part of vLLM's HTTP and CLI contract that grpo-operator relies on from a vLLM wheel.

    pip download --no-deps vllm==X -d /tmp/vllm-wheel
    python scripts/vllm_contract.py /tmp/vllm-wheel/vllm-X-*.whl -o tests/fixtures/vllm-X-contract.json

The wheel's source is parsed, never imported (vLLM needs CUDA and a long list of packages), so this
runs anywhere with the standard library. The fixture it writes is committed: on a version bump,
regenerate it and read the diff, which shows every route, request field, response field, flag,
weight-transfer field and NCCL signature that changed. tests/test_vllm_contract.py checks our requests and the
sidecar's command line against the committed fixture.
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import re
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

# The routers whose routes we call, and whether vLLM serves them only under VLLM_SERVER_DEV_MODE=1
# (checked against the wheel's own router registration below).
ROUTERS = {
    "vllm/entrypoints/serve/instrumentator/health.py": False,
    "vllm/entrypoints/openai/completion/api_router.py": False,
    "vllm/entrypoints/rl/online/api_router.py": True,  # pause/resume and the weight-transfer routes
    "vllm/entrypoints/serve/dev/cache/api_router.py": True,  # /reset_prefix_cache
    "vllm/entrypoints/serve/dev/rpc/api_router.py": True,  # /collective_rpc: the /dev/shm fallback's reload
}
ROUTER_REGISTRATION = "vllm/entrypoints/launchers/api_server/routers.py"
# What the dev-mode branch of the registration must import for ROUTERS' True entries to hold.
DEV_MODE_REGISTRATIONS = ("register_vllm_dev_api_routers", "register_rl_api_routers")

# Request and response models, by file: their fields are what a body may carry.
MODELS = {
    "vllm/entrypoints/openai/completion/protocol.py": (
        "CompletionRequest",
        "CompletionResponse",
        "CompletionResponseChoice",
        "CompletionLogProbs",
    ),
    "vllm/outputs.py": ("WeightVersionSpan",),
    "vllm/distributed/weight_transfer/nccl_common.py": ("NCCLWeightTransferInitInfo",),
    "vllm/distributed/weight_transfer/nccl_engine.py": ("NCCLTrainerInitInfo", "NCCLWeightTransferUpdateInfo"),
}

# `vllm serve` flags: literal add_argument names in these files, plus one --flag per field of the
# frontend dataclasses (cli_args.py derives those from the field names).
FLAG_FILES = ("vllm/entrypoints/common/cli_args.py", "vllm/engine/arg_utils.py")
FRONTEND_ARG_CLASSES = ("BaseFrontendArgs", "FrontendArgs")

# Worker methods the trainer calls through /collective_rpc, and the file of the class defining them.
WORKER = ("vllm/v1/worker/gpu_worker.py", "Worker")
WORKER_METHODS = ("reload_weights",)

# NCCL as vLLM's workers use it when a trainer joins them by nccl_unique_id_b64: the unique id's size
# and the C signatures of the functions the trainer's sender calls (pynccl_wrapper.py; the sender
# uses ncclCommInitRankConfig, whose first four parameters are ncclCommInitRank's), the warm-up
# collective each peer issues after ncclCommInitRank (pynccl.py), and the function that parses the id.
PYNCCL_WRAPPER = "vllm/distributed/device_communicators/pynccl_wrapper.py"
PYNCCL = ("vllm/distributed/device_communicators/pynccl.py", "PyNcclCommunicator", "_init_comm")
NCCL_FUNCTIONS = ("ncclGetErrorString", "ncclGetLastError", "ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRank",
                  "ncclAllReduce", "ncclBroadcast", "ncclCommAbort")
UNIQUE_ID_DECODER = ("vllm/distributed/weight_transfer/nccl_common.py", "decode_nccl_unique_id")

ENVIRONMENT_VARIABLES = ("VLLM_SERVER_DEV_MODE",)
SHARED_REQUIREMENTS = {"torch", "transformers"}


class ContractError(Exception):
    """The wheel lacks something this script expects; the message names it."""


def _source(wheel: zipfile.ZipFile, path: str) -> ast.Module:
    try:
        return ast.parse(wheel.read(path).decode(), filename=path)
    except KeyError:
        raise ContractError(f"{path}: not in the wheel") from None


def _class(module: ast.Module, name: str, path: str) -> ast.ClassDef:
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise ContractError(f"{path}: no class {name}")


def _fields(cls: ast.ClassDef) -> dict[str, str]:
    """A pydantic model's or dataclass's fields and their annotations (ClassVars and private names left out)."""
    fields = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            annotation = ast.unparse(node.annotation)
            if not annotation.startswith("ClassVar") and not node.target.id.startswith("_"):
                fields[node.target.id] = annotation
    return fields


_ARITHMETIC = {ast.Mult: operator.mul, ast.Add: operator.add, ast.Pow: operator.pow}


def _evaluate(node: ast.expr):
    """A literal, or integer arithmetic on literals (``1024 * 1024 * 1024``)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    return ast.literal_eval(node)


def _constant(module: ast.Module, name: str, path: str):
    """The value of an assignment ``NAME = <literal>`` anywhere in ``module``."""
    for node in ast.walk(module):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return _evaluate(node.value)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return _evaluate(node.value)
    raise ContractError(f"{path}: no literal {name}")


def _literal_values(module: ast.Module, name: str, path: str) -> list[str]:
    """The strings of a ``NAME = Literal[...]`` type alias."""
    for node in module.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return [element.value for element in node.value.slice.elts]
    raise ContractError(f"{path}: no Literal alias {name}")


def _body_and_query(function: ast.AsyncFunctionDef | ast.FunctionDef) -> tuple[list[str], list[str]]:
    """The JSON-body fields (``Body(embed=True)`` parameters) and query parameters of a route."""
    body, query = [], []
    arguments = function.args.args
    defaults = [None] * (len(arguments) - len(function.args.defaults)) + list(function.args.defaults)
    for argument, default in zip(arguments, defaults, strict=True):
        declared = ast.unparse(argument.annotation) if argument.annotation else ""
        declared += " = " + ast.unparse(default) if default is not None else ""
        if "Body(" in declared:
            body.append(argument.arg)
        elif "Query(" in declared:
            query.append(argument.arg)
    return body, query


def _raw_body_fields(function: ast.AsyncFunctionDef | ast.FunctionDef) -> list[str]:
    """The fields a route reads from a JSON body it parses itself (``body.get("name")``)."""
    return [
        node.args[0].value
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "get"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "body"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ]


def _routes(module: ast.Module, path: str, dev_mode: bool) -> dict[str, dict]:
    routes = {}
    for node in module.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            if (
                isinstance(decorator, ast.Call)
                and isinstance(decorator.func, ast.Attribute)
                and decorator.func.attr in {"get", "post", "put", "delete"}
                and decorator.args
                and isinstance(decorator.args[0], ast.Constant)
            ):
                body, query = _body_and_query(node)
                body += [name for name in _raw_body_fields(node) if name not in body]
                routes[decorator.args[0].value] = {
                    "method": decorator.func.attr.upper(),
                    "devMode": dev_mode,
                    "body": body,
                    "query": query,
                    "source": path,
                }
    if not routes:
        raise ContractError(f"{path}: no routes found")
    return routes


def _check_dev_mode_registration(module: ast.Module, source: str) -> None:
    """The routers listed as dev-mode-only are registered inside ``if envs.VLLM_SERVER_DEV_MODE:``."""
    for node in ast.walk(module):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "envs.VLLM_SERVER_DEV_MODE":
            branch = "\n".join(ast.unparse(statement) for statement in node.body)
            missing = [name for name in DEV_MODE_REGISTRATIONS if name not in branch]
            if missing:
                raise ContractError(f"{source}: the VLLM_SERVER_DEV_MODE branch no longer registers {missing}")
            return
    raise ContractError(f"{source}: no `if envs.VLLM_SERVER_DEV_MODE:` branch registering routers")


def _flags(wheel: zipfile.ZipFile) -> list[str]:
    flags: set[str] = set()
    for path in FLAG_FILES:
        module = _source(wheel, path)
        for node in ast.walk(module):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                flags.update(
                    arg.value for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("--")
                )
    cli_args = _source(wheel, FLAG_FILES[0])
    for name in FRONTEND_ARG_CLASSES:
        flags.update("--" + field.replace("_", "-") for field in _fields(_class(cli_args, name, FLAG_FILES[0])))
    return sorted(flags)


def _worker_methods(wheel: zipfile.ZipFile) -> dict[str, list[str]]:
    """The keyword parameters of the worker methods /collective_rpc calls (``self`` left out)."""
    path, name = WORKER
    methods = {
        node.name: [argument.arg for argument in node.args.args[1:]]
        for node in _class(_source(wheel, path), name, path).body
        if isinstance(node, ast.FunctionDef) and node.name in WORKER_METHODS
    }
    missing = [method for method in WORKER_METHODS if method not in methods]
    if missing:
        raise ContractError(f"{path}: {name} has no methods {missing}")
    return methods


def _initial_weight_version(wheel: zipfile.ZipFile) -> str:
    """What /weight_info reports before any update: a restarted server says this again."""
    path = "vllm/v1/engine/core.py"
    init = next(
        node
        for node in ast.walk(_class(_source(wheel, path), "EngineCore", path))
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    for node in ast.walk(init):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Attribute)
            and node.targets[0].attr == "_weight_version"
        ):
            return ast.literal_eval(node.value)
    raise ContractError(f"{path}: EngineCore.__init__ sets no _weight_version")


def _function(module: ast.Module, name: str, path: str) -> ast.FunctionDef:
    for node in ast.walk(module):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise ContractError(f"{path}: no function {name}")


def _nccl_unique_id_bytes(module: ast.Module) -> int:
    """The size of vLLM's ``ncclUniqueId``: its one field, ``ctypes.c_byte * N``."""
    for node in _class(module, "ncclUniqueId", PYNCCL_WRAPPER).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_fields_" and len(node.value.elts) == 1:
            _, field_type = node.value.elts[0].elts
            if isinstance(field_type, ast.BinOp) and ast.unparse(field_type.left) == "ctypes.c_byte":
                return _evaluate(field_type.right)
    raise ContractError(f"{PYNCCL_WRAPPER}: ncclUniqueId is not one field of ctypes.c_byte * N")


def _nccl_signatures(module: ast.Module) -> dict[str, dict]:
    """``Function(name, restype, [argtypes])`` of NCCLLibrary.exported_functions, as written."""
    signatures = {}
    for node in ast.walk(_class(module, "NCCLLibrary", PYNCCL_WRAPPER)):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "Function":
            name, restype, argtypes = node.args
            signatures[name.value] = {"restype": ast.unparse(restype),
                                      "argtypes": [ast.unparse(argument) for argument in argtypes.elts]}
    missing = [name for name in NCCL_FUNCTIONS if name not in signatures]
    if missing:
        raise ContractError(f"{PYNCCL_WRAPPER}: NCCLLibrary exports no {missing}")
    return {name: signatures[name] for name in NCCL_FUNCTIONS}


def _nccl_warm_up(wheel: zipfile.ZipFile) -> list[str]:
    """The statements of the warm-up after ncclCommInitRank: the tensor made and the collective on it."""
    path, cls, method = PYNCCL
    init_comm = _function(ast.Module(body=_class(_source(wheel, path), cls, path).body, type_ignores=[]), method, path)
    warm_up = [
        ast.unparse(node)
        for node in ast.walk(init_comm)
        if isinstance(node, (ast.Assign, ast.Expr))
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) in ("torch.zeros", "self.all_reduce")
    ]
    if len(warm_up) != 2:
        raise ContractError(f"{path}: {cls}.{method} no longer makes one tensor and all-reduces it: {warm_up}")
    return warm_up


def _unique_id_decoder(wheel: zipfile.ZipFile) -> dict:
    """The source of the function that parses nccl_unique_id_b64, and the module its ``base64`` is."""
    path, name = UNIQUE_ID_DECODER
    text = wheel.read(path).decode()
    module = ast.parse(text, filename=path)
    aliases = [alias.name for node in module.body if isinstance(node, ast.Import)
               for alias in node.names if (alias.asname or alias.name) == "base64"]
    if not aliases:
        raise ContractError(f"{path}: imports no base64")
    return {"source": ast.get_source_segment(text, _function(module, name, path)), "base64": aliases[0]}


def contract(wheel_path: Path) -> dict:
    with zipfile.ZipFile(wheel_path) as wheel:
        metadata_path = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(wheel.read(metadata_path).decode())
        if metadata["Name"] != "vllm":
            raise ContractError(f"{wheel_path}: a wheel of {metadata['Name']}, not vllm")

        _check_dev_mode_registration(_source(wheel, ROUTER_REGISTRATION), ROUTER_REGISTRATION)
        routes: dict[str, dict] = {}
        for path, dev_mode in ROUTERS.items():
            routes.update(_routes(_source(wheel, path), path, dev_mode))

        models = {}
        for path, names in MODELS.items():
            module = _source(wheel, path)
            for name in names:
                models[name] = _fields(_class(module, name, path))

        protocol_path = "vllm/entrypoints/openai/completion/protocol.py"
        protocol = _class(_source(wheel, protocol_path), "CompletionRequest", protocol_path)
        default_sampling = _constant(ast.Module(body=protocol.body, type_ignores=[]), "_DEFAULT_SAMPLING_PARAMS", protocol_path)

        model_config = "vllm/config/model.py"
        weight_transfer_config = "vllm/config/weight_transfer.py"
        packed = "vllm/distributed/weight_transfer/packed_tensor.py"
        engine = "vllm/v1/engine/__init__.py"
        backends = _fields(_class(_source(wheel, weight_transfer_config), "WeightTransferConfig", weight_transfer_config))
        envs_source = wheel.read("vllm/envs.py").decode()
        missing_env = [name for name in ENVIRONMENT_VARIABLES if f'"{name}"' not in envs_source]
        if missing_env:
            raise ContractError(f"vllm/envs.py: no environment variables {missing_env}")

        return {
            "vllm": metadata["Version"],
            # What the sidecar image must hold beside vLLM, and what a shared trainer image would have to match.
            "requires": sorted(
                line for line in metadata.get_all("Requires-Dist", [])
                if re.match(r"[A-Za-z0-9_.\-]+", line).group() in SHARED_REQUIREMENTS
            ),
            "routes": dict(sorted(routes.items())),
            "models": models,
            "completionDefaultSamplingParams": default_sampling,
            "serveFlags": _flags(wheel),
            "logprobsModes": _literal_values(_source(wheel, model_config), "LogprobsMode", model_config),
            "pauseModes": _literal_values(_source(wheel, engine), "PauseMode", engine),
            "workerMethods": _worker_methods(wheel),
            "weightTransferBackend": backends["backend"],
            "packedDefaults": {
                "bufferSizeBytes": _constant(_source(wheel, packed), "DEFAULT_PACKED_BUFFER_SIZE_BYTES", packed),
                "numBuffers": _constant(_source(wheel, packed), "DEFAULT_PACKED_NUM_BUFFERS", packed),
            },
            "initialWeightVersion": _initial_weight_version(wheel),
            "nccl": {
                "uniqueIdBytes": _nccl_unique_id_bytes(_source(wheel, PYNCCL_WRAPPER)),
                "functions": _nccl_signatures(_source(wheel, PYNCCL_WRAPPER)),
                "warmUp": _nccl_warm_up(wheel),
                "uniqueIdDecoder": _unique_id_decoder(wheel),
            },
            "environmentVariables": list(ENVIRONMENT_VARIABLES),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help="a vllm-*.whl (pip download --no-deps vllm==X)")
    parser.add_argument("-o", "--output", type=Path, help="write the fixture here (default: stdout)")
    args = parser.parse_args(argv)
    try:
        text = json.dumps(contract(args.wheel), indent=1) + "\n"
    except (ContractError, OSError, zipfile.BadZipFile) as error:
        print(f"{args.wheel}: {error}", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
