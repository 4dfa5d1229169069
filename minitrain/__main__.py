from minitrain.cli import main

main()
