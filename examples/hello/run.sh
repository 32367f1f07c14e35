#!/bin/sh
# The quick-start job: greet everyone listed in names.txt.
# jobd runs this file in a folder holding everything submitted beside it; every file it
# writes there (greetings.txt here, plus jobd.stdout and jobd.stderr) comes back.
set -eu
while read -r name; do
    echo "Hello, $name!"
done < names.txt | tee greetings.txt
echo "greeted $(wc -l < greetings.txt) people" >&2
