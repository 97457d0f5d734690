from batchstyle.cli import main

main()
