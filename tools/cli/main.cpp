#include <cstdio>
int main() { std::puts("trellm"); return 0; }
