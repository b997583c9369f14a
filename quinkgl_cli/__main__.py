from quinkgl_cli.cli.app import main

main()
