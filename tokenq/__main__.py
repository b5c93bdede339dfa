from tokenq.cli import main

main()
