"""agentctl's bash and zsh completion scripts: click's own, the text `_AGENTCTL_COMPLETE=bash_source
agentctl` prints, for the package to install. At each TAB they run agentctl with
_AGENTCTL_COMPLETE=bash_complete (or zsh_complete), and click answers without running a command.

    PYTHONPATH=. python3 packaging/completion.py bash > agentctl    # what debian/rules does
    PYTHONPATH=. python3 packaging/completion.py zsh > _agentctl

The package installs the zsh script as a completion function, `_agentctl` in $fpath, which
compinit autoloads by its #compdef line and then calls at every TAB. click's script (8.1.3,
Debian 12's) only registers its function with compdef, so the first TAB of every shell offered
nothing (newer click completes on the first but not the second); its last statement is
replaced here, so that the file completes whenever it is called as `_agentctl` and still
registers itself when sourced.
"""

import sys

from click.shell_completion import get_completion_class

from agent.cli import main
from agent.entry import COMPLETE_VAR

PROG = "agentctl"
ZSH_DISPATCH = f"""
if [[ $zsh_eval_context[-1] == (loadautofunc|shfunc) ]]; then
    _{PROG}_completion "$@"  # called as _{PROG}, autoloaded from $fpath: complete
else
    compdef _{PROG}_completion {PROG}  # sourced or eval'd: register the function
fi
"""


def source(shell: str) -> str:
    completion = get_completion_class(shell)
    if completion is None:
        raise SystemExit(f"completion.py: no completion for shell {shell!r}")
    script = completion(main, {}, PROG, COMPLETE_VAR).source()
    if shell == "zsh":
        head, end, _ = script.rpartition("\n}\n")  # the end of the completion function
        if not end:
            raise SystemExit("completion.py: click's zsh script changed: no function found")
        script = head + end + ZSH_DISPATCH
    return script


if __name__ == "__main__":
    sys.stdout.write(source(sys.argv[1] if len(sys.argv) > 1 else "bash"))
