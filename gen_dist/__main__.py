from gen_dist.cli import main

main()
