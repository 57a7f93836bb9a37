"""The ``bas`` command line, assembled from the verbs' commands (run, batch, masks, generate, edit, export, eval,
tiny-model, demo, ui), ``bas plugins`` and commands from plugins.  Nothing in bas imports this module."""

from __future__ import annotations

import sys

import click

from bas.batches.command import make_batch_command
from bas.core.compat import quiet_libraries as _quiet_libraries
from bas.core.plugins import REGISTER_HOOKS, Plugins, available_plugin_names, shadowed_entry_points
from bas.core.version import __version__
from bas.demo.command import demo, tiny_model
from bas.editing.command import edit
from bas.evaluation.command import eval_command
from bas.exports.command import export
from bas.extraction.command import RunCommand, masks, run
from bas.generation.command import generate
from bas.ui.command import ui as ui_command

# exit codes (docs/reliability.md): the same failure exits with the same code from every command
EXIT_ERROR = 1  # one `Error: ...` line: bad input or option values (whether click or bas checks them), a damaged folder, the machine's limits, a plugin's fault
EXIT_USAGE = 2  # a command line that cannot be read: an unknown option or command, a missing argument or option, an extra argument
EXIT_INTERRUPTED = 130  # Ctrl-C


def close_progress_bars() -> None:
    """End every open progress bar's line, so an error that follows starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class BasGroup(click.Group):
    """bas's commands, then commands from plugins; user errors become one ``Error: ...`` line.

    Plugins' commands are looked up only for a name that is not bas's own, so an installed
    plugin is not even imported to run ``bas run``, ``bas generate``, ...; it can neither replace
    a command nor end the process by being installed (:func:`add_plugin_commands`).
    """

    plugins_loaded = False

    def load_plugin_commands(self) -> None:
        if not self.plugins_loaded:
            self.plugins_loaded = True
            for warning in add_plugin_commands(self):
                click.echo(f"Warning: {warning}", err=True)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None:
            self.load_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def list_commands(self, ctx):
        self.load_plugin_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx):
        from bas.core.failures import known_failure
        from bas.core.training import Interrupted

        try:
            return super().invoke(ctx)
        except Interrupted as exc:
            close_progress_bars()
            click.echo(str(exc), err=True)
            sys.exit(EXIT_INTERRUPTED)
        except KeyboardInterrupt:
            close_progress_bars()
            click.echo("Interrupted; nothing was saved.", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.BadParameter as exc:
            if not isinstance(exc, click.MissingParameter):  # a value click's type or range refuses: as bas's own checks of values
                exc.exit_code = EXIT_ERROR
            raise
        except click.ClickException:
            raise
        except Exception as exc:  # a user's error, the machine's limits, a plugin's fault: one line; a bug keeps its traceback
            error = known_failure(exc)
            if error is None:
                raise
            close_progress_bars()
            raise click.ClickException(str(error)) from None


@click.group(cls=BasGroup)
@click.version_option(__version__, prog_name="bas")
def cli():
    """Teach a Stable Diffusion model several concepts from one image (Break-A-Scene).

    Start with `bas demo`; then `bas run --image IMG --mask M0 --mask M1 --out OUT` and
    `bas generate OUT "a photo of <asset0> at the beach"`.
    """


# the verbs' commands, each defined with its verb (docs/architecture.md); plugins' commands come last (BasGroup)
for command in (run, make_batch_command(run), masks, generate, edit, export, eval_command(RunCommand), tiny_model, demo, ui_command):
    cli.add_command(command)


@cli.command("plugins")
def list_plugins():
    """List every plugin: what it provides, whether it is on by default, where it comes from."""
    from bas.evaluation.evaluate import eval_options

    manager = Plugins(all_installed=True, tolerant=True)
    provides: dict[str, list[str]] = {}
    for kind in REGISTER_HOOKS:
        for entry in manager.registry(kind).entries.values():
            provides.setdefault(entry.plugin, []).append(f"{kind} '{entry.name}'")
    options: dict[str, list[str]] = {}
    for plugin, opt in manager.run_options() + eval_options(manager) + manager.batch_options():
        options.setdefault(plugin, []).append(opt.opts[0])
    for name in available_plugin_names():
        if name in manager.broken:
            click.echo(f"{name}  [broken: {manager.broken[name]}]")
            continue
        info = manager.infos[name]
        state = "on by default" if info.default else "opt-in (--plugin " + name + ")"
        click.echo(f"{name}  [{state}; {info.source}]")
        if info.description:
            click.echo(f"    {info.description}")
        if provides.get(name):
            click.echo(f"    provides: {', '.join(provides[name])}")
        if options.get(name):
            click.echo(f"    options: {' '.join(options[name])}")
    if manager.broken:
        names = ", ".join(sorted(manager.broken))
        click.echo(f"Warning: {len(manager.broken)} plugin(s) could not be loaded ({names}); see their lines above.", err=True)
    for entry in shadowed_entry_points():
        click.echo(f"Warning: the installed plugin {entry} has the name of a built-in plugin and is never loaded; rename its entry point.", err=True)


def add_plugin_commands(group: click.Group) -> list[str]:
    """Add every installed plugin's commands to ``group``; return warnings about what was left out.

    Each plugin registers into a group of its own, so it cannot remove or replace a command; a
    command named as one ``group`` has already is left out, as are both of two plugins' commands
    of one name; a plugin that fails to import or raises (``sys.exit`` included) is named and
    skipped while the others' commands work.
    """
    from bas.core.plugins import PerPlugin

    own = set(group.commands)
    manager = Plugins(all_installed=True, tolerant=True)
    groups: dict[str, click.Group] = {}

    def group_for(plugin: str) -> click.Group:
        return groups.setdefault(plugin, click.Group(name=plugin))

    manager.call_each("bas_register_commands", cli=PerPlugin(group_for))
    warnings = [f"plugin '{name}' was skipped: {message}" for name, message in manager.broken.items()]
    offered: dict[str, list[tuple[str, click.Command]]] = {}
    for plugin, plugin_group in groups.items():
        if plugin in manager.broken:
            continue
        for name, command in plugin_group.commands.items():
            offered.setdefault(name, []).append((plugin, command))
    for name, offers in sorted(offered.items()):
        plugins = [plugin for plugin, _ in offers]
        if name in own:
            warnings.append(f"plugin '{plugins[0]}' adds a command '{name}', which bas has already; it is left out.")
        elif len(offers) > 1:
            warnings.append(f"plugins {' and '.join(plugins)} both add a command '{name}'; neither is used (uninstall one).")
        else:
            group.add_command(offers[0][1], name)
    return warnings


def main(args: list[str] | None = None) -> None:
    """Entry point: every user error is one ``Error: ...`` line on stderr and a non-zero exit."""
    _quiet_libraries()
    try:
        cli.main(args=args, prog_name="bas", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.UsageError as exc:
        from bas.option_hints import unknown_option_message

        named = unknown_option_message(exc) if isinstance(exc, click.NoSuchOption) else None  # diffusers' names
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"Error: {named or exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)  # EXIT_USAGE, or EXIT_ERROR for a refused value (BasGroup.invoke)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
