"""What a person sees while m9 works: progress displays and the engines' console kept quiet."""
