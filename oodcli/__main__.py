from oodcli.cli import run

run()
