from centime.cli import main

main()
