"""The public API is typed and documented (py.typed ships): every public callable of the Win32
facade and of the Pythonic API has a docstring and annotations on every parameter and its return,
and the hints resolve; `__all__` names exist and list what the modules export. Introspection
only: no daemon."""

import inspect
import sys
import typing

import pytest

import shmheap
from shmheap import client, clipboard, com, crt, heap, private_heap, shared_buffer, win32

# Every public function and class these modules define, with the public methods of each class.
MODULES = [win32, client, private_heap, shared_buffer, clipboard, crt, com]
# heap.py's public face: the allocator and the page source it runs over.
CLASSES = [heap.Heap, heap.PageSource]


def _members(cls):
    """(qualified name, function) of each public method, property getter and __init__ that
    `cls` defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name != "__init__":
            continue
        if isinstance(value, property):
            value = value.fget
        elif isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value):
            yield f"{cls.__module__}.{cls.__qualname__}.{name}", value


def _public():
    """(qualified name, object) of every public function, class and method under test, each
    once (the facade's A/W names are aliases of one function)."""
    found = {}
    classes = list(CLASSES)
    for module in MODULES:
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                found.setdefault(id(value), (f"{module.__name__}.{name}", value))
            elif inspect.isclass(value):
                classes.append(value)
    # The facade's exports from other modules (MEMORY_BASIC_INFORMATION, WinError) count too.
    for name in win32.__all__:
        value = getattr(win32, name)
        if inspect.isclass(value) and value.__module__.startswith("shmheap"):
            classes.append(value)
    for cls in classes:
        found.setdefault(id(cls), (f"{cls.__module__}.{cls.__qualname__}", cls))
        for qualname, function in _members(cls):
            found.setdefault(id(function), (qualname, function))
    return sorted(found.values(), key=lambda item: item[0])


PUBLIC = _public()
FUNCTIONS = [(name, value) for name, value in PUBLIC if inspect.isfunction(value)]


def _has_docstring(obj):
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(obj.__name__ + "("):
        return False  # the signature a dataclass makes up when it has no docstring
    return bool(doc.strip())


def test_the_walk_finds_the_api():
    names = {name for name, _ in PUBLIC}
    for expected in ["shmheap.win32.HeapAlloc", "shmheap.win32.view", "shmheap.win32.SYSTEM_INFO",
                     "shmheap.client.connect", "shmheap.client.Client.share",
                     "shmheap.client.Client.closed", "shmheap.heap.Heap.free",
                     "shmheap.heap.PageSource.commit", "shmheap.shared_buffer.SharedBuffer.numpy",
                     "shmheap.clipboard.Clipboard.paste"]:
        assert expected in names
    assert len(FUNCTIONS) > 150


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_callable_has_a_docstring(name, obj):
    if inspect.isfunction(obj) and obj.__name__ == "__init__":
        return  # the class's docstring says what it makes
    assert _has_docstring(obj), f"{name} has no docstring"


@pytest.mark.parametrize("name, function", FUNCTIONS, ids=[name for name, _ in FUNCTIONS])
def test_public_callable_is_annotated(name, function):
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if "." in function.__qualname__ and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]  # a method's own object needs no hint
    missing = [p.name for p in parameters if p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without a hint: {missing}"
    assert signature.return_annotation is not inspect.Signature.empty, f"{name} has no return hint"


def test_hints_resolve():
    """Every hint names something real (names imported only for type checkers supplied)."""
    numpy = pytest.importorskip("numpy")
    extra = {"Client": client.Client, "Clipboard": clipboard.Clipboard, "Heap": heap.Heap, "ndarray": numpy.ndarray}
    for name, function in FUNCTIONS:
        module = vars(sys.modules[function.__module__])
        typing.get_type_hints(function, globalns=module, localns=extra)


def test_win32_all_names_exist():
    missing = [name for name in win32.__all__ if not hasattr(win32, name)]
    assert not missing
    assert len(win32.__all__) == len(set(win32.__all__))


def test_win32_all_lists_every_public_name():
    defined = {name for name, value in vars(win32).items()
               if not name.startswith("_") and getattr(value, "__module__", None) == win32.__name__}
    assert defined - set(win32.__all__) == set()
    assert {"view", "read", "write", "SYSTEM_INFO", "MEMORYSTATUSEX", "PROCESS_HEAP_ENTRY",
            "MEMORY_BASIC_INFORMATION", "WinError", "ERROR_INVALID_HANDLE", "HEAP_ZERO_MEMORY",
            "MoveMemory", "CreateFileMappingW"} <= set(win32.__all__)


def test_win32_star_import_brings_the_api_only():
    namespace = {}
    exec("from shmheap.win32 import *", namespace)
    assert {"HeapAlloc", "GetLastError", "PAGE_READWRITE", "ERROR_NOACCESS"} <= set(namespace)
    assert not {"default_client", "client_module", "ctypes", "ShmheapError"} & set(namespace)


def test_package_all_names_exist():
    assert [name for name in shmheap.__all__ if not hasattr(shmheap, name)] == []
    assert len(shmheap.__all__) == len(set(shmheap.__all__))


def test_package_all_lists_every_public_name():
    exported = {name for name, value in vars(shmheap).items()
                if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))}
    assert exported - set(shmheap.__all__) == set()
