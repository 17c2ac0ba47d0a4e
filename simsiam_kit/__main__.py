from simsiam_kit.cli import main

main()
