"""`verl doctor`: versions, devices, and whether this combination is supported."""

import typer


def command(
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check Python, torch, transformers, ray and vllm versions and the devices.

    Exits 0 when the combination is supported, 1 when not (each problem comes with its fix).

    Examples:

      verl doctor

      verl doctor --json > env.json
    """
    import json

    from rich.console import Console

    from verlcli import doctor

    env = doctor.collect()
    checks = doctor.run_checks(env)
    if as_json:
        print(json.dumps(doctor.report_dict(env, checks), indent=2))
    else:
        doctor.render(env, checks, Console())
    raise typer.Exit(0 if doctor.supported(checks) else 1)
